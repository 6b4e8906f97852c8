//! What the calls' bodies share: required arguments, paging over ordered lists, and the
//! job layer's refusals as answers.

use proto::coordinator as pb;
use tonic::Status;

use crate::state::command::{Job, JobSpec, Op};

/// Refuses a call whose required string argument is empty.
pub(super) fn need(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(())
    }
}

/// Pagination over an ordered list: the token is the last id of the previous page.
pub(super) fn page<T: Clone>(
    items: impl Iterator<Item = (String, T)>,
    p: Option<&pb::PageRequest>,
) -> (Vec<T>, String) {
    let size = p.map_or(0, |p| p.page_size).clamp(0, 1000);
    let size = if size == 0 { 1000 } else { size as usize };
    let after = p.map(|p| p.page_token.clone()).unwrap_or_default();
    let mut out = Vec::new();
    let mut last = String::new();
    let mut more = false;
    for (id, v) in items {
        if !after.is_empty() && id <= after {
            continue;
        }
        if out.len() == size {
            more = true;
            break;
        }
        last = id;
        out.push(v);
    }
    (out, if more { last } else { String::new() })
}

/// The command that starts a job.
pub(super) fn job(spec: JobSpec) -> Op {
    Op::StartJob(Job {
        spec: Some(spec),
        ..Default::default()
    })
}

/// A job-layer refusal as the call's answer.
pub(super) fn job_status(e: crate::jobs::JobError) -> Status {
    match e {
        crate::jobs::JobError::Refused { code, message } => Status::new(code, message),
        crate::jobs::JobError::Transient { what, source } => {
            let mut s = Status::new(source.code(), format!("{what}: {}", source.message()));
            // Kept: it says which daemon behind the coordinator did not answer.
            *s.metadata_mut() = source.metadata().clone();
            s
        }
        other => Status::unavailable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transient_job_error_keeps_which_daemon_did_not_answer() {
        let mut source = Status::unavailable("tcp connect error");
        source.metadata_mut().insert(
            pool_client::UNREACHABLE_BACKEND,
            "127.0.0.1:7300".parse().unwrap(),
        );
        let s = job_status(crate::jobs::JobError::Transient {
            what: "listing exports of volume v".into(),
            source,
        });
        assert_eq!(pool_client::unreachable_backend(&s), Some("127.0.0.1:7300"));
        assert_eq!(
            s.message(),
            "listing exports of volume v: tcp connect error"
        );
    }

    fn items(n: usize) -> impl Iterator<Item = (String, usize)> {
        (0..n).map(|i| (format!("id-{i:03}"), i))
    }

    fn req(size: u32, token: &str) -> pb::PageRequest {
        pb::PageRequest {
            page_size: size,
            page_token: token.into(),
        }
    }

    #[test]
    fn pages_follow_the_last_id_and_end_with_an_empty_token() {
        let (first, next) = page(items(5), Some(&req(2, "")));
        assert_eq!((first, next.as_str()), (vec![0, 1], "id-001"));
        let (second, next) = page(items(5), Some(&req(2, &next)));
        assert_eq!((second, next.as_str()), (vec![2, 3], "id-003"));
        let (last, next) = page(items(5), Some(&req(2, &next)));
        assert_eq!((last, next.as_str()), (vec![4], ""));
    }

    #[test]
    fn a_page_is_at_most_a_thousand_items() {
        for p in [None, Some(req(0, "")), Some(req(5000, ""))] {
            let (got, next) = page(items(1001), p.as_ref());
            assert_eq!(got.len(), 1000);
            assert_eq!(next, "id-999");
        }
    }

    #[test]
    fn an_empty_required_argument_is_refused_by_name() {
        let e = need("name", "").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.message(), "name is required");
        assert!(need("name", "x").is_ok());
    }
}
