//! Join files: what `poolctl host-join NAME`, `storage-join NAME` and `member-join ID`
//! make. The pool issues a one-time, expiring token for that one identity; the file holds
//! it with what the new daemon needs to trust the pool from the start (the pool id, the
//! CA bundle, the members' addresses), so no trust-on-first-use is needed.
//!
//! The file is TOML (the fields of [`JoinFile`]); it is a secret until used or expired:
//! written 0600, never over an existing file, or printed on stdout when no `--out` is
//! given. The token never goes on a command line: daemons read it from the file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, bail};
use pool_client::join::JoinFile;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};

/// Parses a lifetime: `90s`, `30m`, `1h`, `1d`, or plain seconds.
pub fn parse_ttl(s: &str) -> Result<u32, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u32 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and s, m, h or d (e.g. 1h)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(mult)
        .filter(|&t| t > 0)
        .ok_or_else(|| format!("{s:?}: out of range"))
}

/// Asks the pool for a token for `role`/`name` and writes the join file to `out` (0600,
/// never over an existing file), or prints it when `out` is `None`.
pub async fn create(
    ctl: &mut Ctl,
    role: pb::JoinRole,
    name: String,
    ttl_seconds: Option<u32>,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    // Refuse before the pool spends a token on a file that cannot be written.
    if let Some(out) = out
        && out.symlink_metadata().is_ok()
    {
        bail!("{} exists; a join file is never overwritten", out.display());
    }
    let r = call!(
        ctl.client,
        create_join_token,
        pb::CreateJoinTokenRequest {
            request_id: pool_client::new_request_id(),
            role: role as i32,
            name,
            ttl_seconds: ttl_seconds.unwrap_or(0),
        }
    )?;
    let expires_at_ms = r.expires_at.as_ref().map_or(0, |t| {
        u64::try_from(t.seconds).unwrap_or(0) * 1000
            + u64::try_from(t.nanos).unwrap_or(0) / 1_000_000
    });
    let minutes = expires_at_ms
        .saturating_sub(proto::unix_ms())
        .div_ceil(60_000);
    let expires_at = format!("in {minutes} min");
    let file = JoinFile {
        pool_id: r.pool_id,
        identity: r.identity,
        members: r.member_addresses,
        expires_at_ms,
        ca_pem: r.ca_bundle_pem,
        token: r.token,
    };
    let text = format!(
        "# A one-time join token for {} in pool {}; it expires {}. Keep it secret.\n{}",
        file.identity,
        file.pool_id,
        expires_at,
        file.to_toml().context("encoding the join file")?
    );
    match out {
        Some(out) => {
            write_new_private(out, text.as_bytes())?;
            eprintln!(
                "join file for {} written to {} (0600); it expires {expires_at}",
                file.identity,
                out.display()
            );
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// Creates `path` 0600 with `bytes`; an existing file is an error, never replaced.
fn write_new_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (a join file is never overwritten)",
                path.display()
            )
        })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_parse_with_units_and_refuse_the_rest() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("30m"), Ok(1800));
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("1d"), Ok(86_400));
        for bad in ["", "h", "1w", "-1h", "0", "1.5h", "99999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn join_files_are_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("join.toml");
        write_new_private(&path, b"token = \"x\"\n").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(write_new_private(&path, b"other").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"token = \"x\"\n");
    }
}
