//! The claim record: one claim as the commit script writes it into Redis
//! (the claimed hash, the idempotency hash and the node's backlog), as JSON
//! whose numbers are all strings so Lua never rounds them.

use std::sync::Arc;

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
