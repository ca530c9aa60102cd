//! The claim record: one claim as the commit script writes it into Redis
//! (the claimed hash, the idempotency hash and the node's backlog), as JSON
//! whose numbers are all strings so Lua never rounds them. The node writes
//! it ([`Record::head`]); the script only adds the user's claim count.

use std::{io::Write, sync::Arc};

use super::error::ClusterError;
use crate::vocab::Claim;

/// One claim as the commit script recorded it (JSON in Redis; every number
/// is a string there so Lua never rounds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Claim id (unique across the cluster).
    pub id: u64,
    /// Activity.
    pub activity: String,
    /// Ticket type.
    pub ticket: String,
    /// Code.
    pub code: String,
    /// User id.
    pub user: u64,
    /// The user's n-th claim in the activity (1-based).
    pub n: u64,
    /// Claim time, Unix ms.
    pub ms: i64,
    /// The node that committed it.
    pub node: String,
    /// The attempt that committed it.
    pub nonce: String,
    /// Idempotency key, or empty.
    pub key: String,
}

#[derive(serde::Deserialize)]
struct RawRecord {
    id: String,
    user: String,
    ticket: String,
    code: String,
    ms: String,
    node: String,
    nonce: String,
    n: String,
    #[serde(default)]
    key: String,
}

impl Record {
    /// The record of a claim the commit script is about to write, up to
    /// the value of `n` (the user's n-th claim, which only Redis knows):
    /// the script appends `n` and `"}`. Written here rather than by `cjson`
    /// in the script, which runs one at a time for the whole cluster.
    /// Numbers are strings, as `cjson` wrote them.
    #[allow(clippy::too_many_arguments)]
    pub fn head(id: u64, user: u64, ticket: &str, code: &str, ms: i64, node: &str, nonce: &str, key: &str) -> String {
        let mut out = Vec::with_capacity(128 + ticket.len() + code.len() + node.len() + nonce.len() + key.len());
        let string = |out: &mut Vec<u8>, name: &str, value: &str| {
            out.extend_from_slice(name.as_bytes());
            let _ = serde_json::to_writer(&mut *out, value);
        };
        // Writing into a Vec cannot fail.
        let _ = write!(out, r#"{{"id":"{id}","user":"{user}","ms":"{ms}""#);
        string(&mut out, ",\"ticket\":", ticket);
        string(&mut out, ",\"code\":", code);
        string(&mut out, ",\"node\":", node);
        string(&mut out, ",\"nonce\":", nonce);
        string(&mut out, ",\"key\":", key);
        out.extend_from_slice(br#","n":""#);
        // ASCII, and `&str`s as serde_json escapes them: UTF-8.
        String::from_utf8(out).expect("JSON written from &strs is UTF-8")
    }

    /// Parses a record of `activity`.
    pub fn parse(activity: &str, json: &str) -> Result<Record, ClusterError> {
        let bad = || ClusterError::Protocol(format!("claim record {json:?}"));
        let r: RawRecord = serde_json::from_str(json).map_err(|_| bad())?;
        Ok(Record {
            id: r.id.parse().map_err(|_| bad())?,
            activity: activity.to_owned(),
            ticket: r.ticket,
            code: r.code,
            user: r.user.parse().map_err(|_| bad())?,
            n: r.n.parse().map_err(|_| bad())?,
            ms: r.ms.parse().map_err(|_| bad())?,
            node: r.node,
            nonce: r.nonce,
            key: r.key,
        })
    }

    /// The claim this record describes.
    pub fn to_claim(&self, activity: &Arc<str>) -> Claim {
        Claim {
            id: self.id,
            activity_id: activity.clone(),
            ticket_id: Arc::from(self.ticket.as_str()),
            code: Arc::from(self.code.as_str()),
            user_id: self.user,
            claimed_at_ms: self.ms,
            idempotency_key: (!self.key.is_empty()).then(|| Arc::from(self.key.as_str())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_from_the_scripts_json() {
        // What cjson.encode writes in the commit script (numbers as strings).
        let json = r#"{"id":"4097","user":"42","ticket":"t1","code":"ABC","ms":"1732456789012","node":"n1","nonce":"ff.7","n":"2","key":""}"#;
        let r = Record::parse("a1", json).unwrap();
        assert_eq!((r.id, r.user, r.n, r.ms), (4097, 42, 2, 1_732_456_789_012));
        let claim = r.to_claim(&Arc::from("a1"));
        assert_eq!(claim.idempotency_key, None);
        assert_eq!((&*claim.code, &*claim.ticket_id, claim.user_id), ("ABC", "t1", 42));
        let keyed = json.replace(r#""key":"""#, r#""key":"k-1""#);
        assert_eq!(
            Record::parse("a1", &keyed)
                .unwrap()
                .to_claim(&Arc::from("a1"))
                .idempotency_key
                .as_deref(),
            Some("k-1")
        );
    }

    #[test]
    fn a_head_the_script_completes_parses_back() {
        let key = "k \"quoted\" \\ back/slash \u{1} 券";
        let head = Record::head(4097, 42, "t1", "AB\"C", -5, "n1", "ff.7", key);
        // What the commit script appends: `n`, then `"}`.
        let r = Record::parse("a1", &format!("{head}3\"}}")).unwrap();
        assert_eq!((r.id, r.user, r.n, r.ms), (4097, 42, 3, -5));
        assert_eq!(
            (&*r.ticket, &*r.code, &*r.node, &*r.nonce, &*r.key),
            ("t1", "AB\"C", "n1", "ff.7", key)
        );
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        for bad in [
            "",
            "{}",
            r#"{"id":"x","user":"1","ticket":"t","code":"c","ms":"1","node":"n","nonce":"o","n":"1"}"#,
        ] {
            assert!(Record::parse("a", bad).is_err(), "{bad}");
        }
    }
}
