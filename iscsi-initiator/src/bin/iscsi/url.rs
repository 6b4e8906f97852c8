//! `iscsi://[USER[%SECRET]@]HOST[:PORT]/TARGET/LUN`, the URL form libiscsi's tools use.

use anyhow::{Context, bail};
use iscsi_initiator::Chap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunUrl {
    pub portal: String,
    pub target: String,
    pub lun: u16,
    pub chap: Option<Chap>,
}

impl LunUrl {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let rest = s
            .strip_prefix("iscsi://")
            .with_context(|| format!("{s:?} does not start with iscsi://"))?;
        let (auth, rest) = match rest.split_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let mut parts = rest.splitn(3, '/');
        let portal = parts.next().unwrap_or_default();
        let target = parts.next().unwrap_or_default();
        let lun = parts.next().unwrap_or_default().trim_end_matches('/');
        if portal.is_empty() || target.is_empty() || lun.is_empty() {
            bail!("{s:?} is not iscsi://HOST[:PORT]/TARGET/LUN");
        }
        let lun: u16 = lun
            .parse()
            .with_context(|| format!("LUN {lun:?} is not a number"))?;
        let chap = auth.map(|a| match a.split_once('%') {
            Some((u, p)) => Chap::new(u, p.as_bytes().to_vec()),
            None => Chap::new(a, Vec::new()),
        });
        Ok(Self {
            portal: iscsi_initiator::config::with_default_port(portal),
            target: target.to_owned(),
            lun,
            chap,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libiscsi_urls() {
        let u = LunUrl::parse("iscsi://127.0.0.1:3261/iqn.2024-01.org.x:t/1").unwrap();
        assert_eq!(u.portal, "127.0.0.1:3261");
        assert_eq!(u.target, "iqn.2024-01.org.x:t");
        assert_eq!(u.lun, 1);
        assert!(u.chap.is_none());
        let u = LunUrl::parse("iscsi://me%pw@host/iqn.x/0").unwrap();
        assert_eq!(u.portal, "host:3260");
        assert_eq!(u.chap.unwrap().secret, b"pw");
        assert!(LunUrl::parse("iscsi://host/iqn.x").is_err());
        assert!(LunUrl::parse("http://host/iqn.x/0").is_err());
        assert!(LunUrl::parse("iscsi://host/iqn.x/zero").is_err());
    }
}
