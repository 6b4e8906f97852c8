//! Text keys (RFC 7143 §6 and §13): `key=value` pairs separated by NUL bytes, carried by
//! Login and Text PDUs, and the rules that turn an offer and our own value into the
//! negotiated result.

use crate::PduError;

/// Longest key name (RFC 7143 §6.1).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value we accept. The RFC caps most values at 255 bytes; binary CHAP values may
/// be longer, so the parser allows more and each key's handler checks its own limit.
pub const MAX_VALUE_LEN: usize = 8192;

/// Parses a data segment of NUL-terminated `key=value` pairs, in order. Empty strings
/// (padding, doubled NULs) are skipped; a final pair without its NUL is accepted.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, PduError> {
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        let Some(eq) = item.iter().position(|&b| b == b'=') else {
            return Err(PduError::BadText {
                reason: "a key without '='",
            });
        };
        let (key, value) = (&item[..eq], &item[eq + 1..]);
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(PduError::BadText {
                reason: "a key name that is empty or longer than 63 bytes",
            });
        }
        if !key
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || b".-+@_".contains(&c))
        {
            return Err(PduError::BadText {
                reason: "a key name with a character outside a-z A-Z 0-9 . - + @ _",
            });
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(PduError::BadText {
                reason: "a value longer than 8192 bytes",
            });
        }
        let value = std::str::from_utf8(value).map_err(|_| PduError::BadText {
            reason: "a value that is not UTF-8",
        })?;
        // Key names are ASCII, checked above.
        let key = String::from_utf8_lossy(key).into_owned();
        out.push((key, value.to_owned()));
    }
    Ok(out)
}

/// Encodes pairs as NUL-terminated `key=value` strings.
pub fn encode<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref().as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_ref().as_bytes());
        out.push(0);
    }
    out
}

/// Special answers a negotiation can give instead of a value (§6.2).
pub const NOT_UNDERSTOOD: &str = "NotUnderstood";
pub const IRRELEVANT: &str = "Irrelevant";
pub const REJECT: &str = "Reject";

/// Parses a numerical value: decimal, or hexadecimal with a 0x prefix (§6.1).
pub fn parse_number(v: &str) -> Result<u64, PduError> {
    let bad = PduError::BadNumber {
        value: v.chars().take(32).collect(),
    };
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if hex.is_empty() || hex.len() > 16 {
            return Err(bad);
        }
        u64::from_str_radix(hex, 16).map_err(|_| bad)
    } else {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad);
        }
        v.parse().map_err(|_| bad)
    }
}

/// Parses `Yes`/`No`.
pub fn parse_bool(v: &str) -> Result<bool, PduError> {
    match v {
        "Yes" => Ok(true),
        "No" => Ok(false),
        _ => Err(PduError::BadBoolean {
            value: v.chars().take(32).collect(),
        }),
    }
}

pub fn bool_str(b: bool) -> &'static str {
    if b { "Yes" } else { "No" }
}

/// How the result of a key is decided (§6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The sender states a value; there is no answer.
    Declarative,
    /// Result is the AND of both booleans.
    And,
    /// Result is the OR of both booleans.
    Or,
    /// Result is the smaller number.
    Min,
    /// Result is the larger number.
    Max,
    /// The responder picks the first offered value it supports.
    List,
}

/// When a key may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Security,
    Operational,
    /// Either login stage.
    Login,
    /// Full feature phase too (Text requests).
    Any,
}

/// One key of RFC 7143 §13 (and the CHAP keys of §12.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpec {
    pub name: &'static str,
    pub kind: Kind,
    pub phase: Phase,
    /// Session-wide (leading login only) rather than per connection.
    pub session_wide: bool,
    /// Inclusive range for numerical keys.
    pub min: u64,
    pub max: u64,
    /// The value both sides assume when the key is never sent.
    pub default: &'static str,
}

const fn key(
    name: &'static str,
    kind: Kind,
    phase: Phase,
    session_wide: bool,
    range: (u64, u64),
    default: &'static str,
) -> KeySpec {
    KeySpec {
        name,
        kind,
        phase,
        session_wide,
        min: range.0,
        max: range.1,
        default,
    }
}

const N: (u64, u64) = (0, 0);

/// Every key of RFC 7143 §13 that a target must understand.
pub const KEYS: &[KeySpec] = &[
    key("AuthMethod", Kind::List, Phase::Security, false, N, "None"),
    key(
        "HeaderDigest",
        Kind::List,
        Phase::Operational,
        false,
        N,
        "None",
    ),
    key(
        "DataDigest",
        Kind::List,
        Phase::Operational,
        false,
        N,
        "None",
    ),
    key(
        "MaxConnections",
        Kind::Min,
        Phase::Operational,
        true,
        (1, 65535),
        "1",
    ),
    key("SendTargets", Kind::Declarative, Phase::Any, false, N, ""),
    key("TargetName", Kind::Declarative, Phase::Login, true, N, ""),
    key(
        "InitiatorName",
        Kind::Declarative,
        Phase::Login,
        true,
        N,
        "",
    ),
    key("TargetAlias", Kind::Declarative, Phase::Login, true, N, ""),
    key(
        "InitiatorAlias",
        Kind::Declarative,
        Phase::Login,
        true,
        N,
        "",
    ),
    key("TargetAddress", Kind::Declarative, Phase::Any, true, N, ""),
    key(
        "TargetPortalGroupTag",
        Kind::Declarative,
        Phase::Login,
        true,
        (0, 65535),
        "",
    ),
    key("InitialR2T", Kind::Or, Phase::Operational, true, N, "Yes"),
    key(
        "ImmediateData",
        Kind::And,
        Phase::Operational,
        true,
        N,
        "Yes",
    ),
    key(
        "MaxRecvDataSegmentLength",
        Kind::Declarative,
        Phase::Any,
        false,
        (512, 16_777_215),
        "8192",
    ),
    key(
        "MaxBurstLength",
        Kind::Min,
        Phase::Operational,
        true,
        (512, 16_777_215),
        "262144",
    ),
    key(
        "FirstBurstLength",
        Kind::Min,
        Phase::Operational,
        true,
        (512, 16_777_215),
        "65536",
    ),
    key(
        "DefaultTime2Wait",
        Kind::Max,
        Phase::Operational,
        true,
        (0, 3600),
        "2",
    ),
    key(
        "DefaultTime2Retain",
        Kind::Min,
        Phase::Operational,
        true,
        (0, 3600),
        "20",
    ),
    key(
        "MaxOutstandingR2T",
        Kind::Min,
        Phase::Operational,
        true,
        (1, 65535),
        "1",
    ),
    key(
        "DataPDUInOrder",
        Kind::Or,
        Phase::Operational,
        true,
        N,
        "Yes",
    ),
    key(
        "DataSequenceInOrder",
        Kind::Or,
        Phase::Operational,
        true,
        N,
        "Yes",
    ),
    key(
        "ErrorRecoveryLevel",
        Kind::Min,
        Phase::Operational,
        true,
        (0, 2),
        "0",
    ),
    key(
        "SessionType",
        Kind::Declarative,
        Phase::Login,
        true,
        N,
        "Normal",
    ),
    key(
        "TaskReporting",
        Kind::List,
        Phase::Operational,
        true,
        N,
        "RFC3720",
    ),
    key(
        "iSCSIProtocolLevel",
        Kind::Min,
        Phase::Operational,
        true,
        (0, 31),
        "1",
    ),
    key(
        "X#NodeArchitecture",
        Kind::Declarative,
        Phase::Login,
        true,
        N,
        "",
    ),
    key("IFMarker", Kind::And, Phase::Operational, false, N, "No"),
    key("OFMarker", Kind::And, Phase::Operational, false, N, "No"),
    key(
        "OFMarkInt",
        Kind::Min,
        Phase::Operational,
        false,
        (1, 65535),
        "2048",
    ),
    key(
        "IFMarkInt",
        Kind::Min,
        Phase::Operational,
        false,
        (1, 65535),
        "2048",
    ),
    key("CHAP_A", Kind::List, Phase::Security, false, N, ""),
    key(
        "CHAP_I",
        Kind::Declarative,
        Phase::Security,
        false,
        (0, 255),
        "",
    ),
    key("CHAP_C", Kind::Declarative, Phase::Security, false, N, ""),
    key("CHAP_N", Kind::Declarative, Phase::Security, false, N, ""),
    key("CHAP_R", Kind::Declarative, Phase::Security, false, N, ""),
];

/// The spec of a standard key.
pub fn spec(name: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.name == name)
}

/// Negotiates a numerical key: the offer must be a number in the key's range; the result
/// is the smaller (Min) or larger (Max) of the offer and `ours`.
pub fn negotiate_number(spec: &KeySpec, offered: &str, ours: u64) -> Result<u64, PduError> {
    let v = parse_number(offered)?;
    if v < spec.min || v > spec.max {
        return Err(PduError::OutOfRange {
            key: spec.name,
            value: v,
            min: spec.min,
            max: spec.max,
        });
    }
    Ok(match spec.kind {
        Kind::Max => v.max(ours),
        _ => v.min(ours),
    })
}

/// Negotiates a boolean key: AND or OR of the offer and `ours`.
pub fn negotiate_bool(spec: &KeySpec, offered: &str, ours: bool) -> Result<bool, PduError> {
    let v = parse_bool(offered)?;
    Ok(match spec.kind {
        Kind::Or => v || ours,
        _ => v && ours,
    })
}

/// Negotiates a list key: the first offered value (in the offerer's order of preference)
/// that we support, or `None` when there is none (answer `Reject`).
pub fn negotiate_list<'a>(offered: &'a str, supported: &[&str]) -> Option<&'a str> {
    offered
        .split(',')
        .find(|o| supported.iter().any(|s| s.eq_ignore_ascii_case(o)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_in_order_and_skips_padding() {
        let data = b"InitiatorName=iqn.x\0SessionType=Normal\0\0\0";
        let kv = parse(data).unwrap();
        assert_eq!(
            kv,
            vec![
                ("InitiatorName".into(), "iqn.x".into()),
                ("SessionType".into(), "Normal".into())
            ]
        );
        assert_eq!(parse(&encode(&kv)).unwrap(), kv);
    }

    #[test]
    fn rejects_malformed_pairs() {
        assert!(parse(b"novalue\0").is_err());
        assert!(parse(b"=x\0").is_err());
        assert!(parse(b"bad key=x\0").is_err());
        assert!(parse(&[b'a', b'=', 0xff, 0]).is_err());
        let long = format!("{}=1\0", "k".repeat(64));
        assert!(parse(long.as_bytes()).is_err());
    }

    #[test]
    fn numbers_and_booleans() {
        assert_eq!(parse_number("8192").unwrap(), 8192);
        assert_eq!(parse_number("0x2000").unwrap(), 8192);
        assert!(parse_number("").is_err());
        assert!(parse_number("-1").is_err());
        assert!(parse_number("99999999999999999999999").is_err());
        assert!(parse_bool("yes").is_err());
        assert!(parse_bool("Yes").unwrap());
    }

    #[test]
    fn negotiation_rules_follow_each_kind() {
        let burst = spec("MaxBurstLength").unwrap();
        assert_eq!(negotiate_number(burst, "1048576", 262144).unwrap(), 262144);
        assert_eq!(negotiate_number(burst, "4096", 262144).unwrap(), 4096);
        assert!(negotiate_number(burst, "100", 262144).is_err());
        let wait = spec("DefaultTime2Wait").unwrap();
        assert_eq!(negotiate_number(wait, "0", 2).unwrap(), 2);
        let r2t = spec("InitialR2T").unwrap();
        assert!(negotiate_bool(r2t, "No", true).unwrap());
        assert!(!negotiate_bool(r2t, "No", false).unwrap());
        let imm = spec("ImmediateData").unwrap();
        assert!(!negotiate_bool(imm, "Yes", false).unwrap());
        assert_eq!(
            negotiate_list("CRC32C,None", &["None", "CRC32C"]),
            Some("CRC32C")
        );
        assert_eq!(negotiate_list("KRB5,SRP", &["None", "CHAP"]), None);
    }
}
