//! One module per API area.

pub mod act;
pub mod admin;
pub mod ops;
pub mod page;
pub mod queue;
pub mod ticket;
pub mod user;

use serde::Serialize;

use crate::{clock::Rfc3339Ms, vocab::Claim};

/// A claim as the API shows it to its owner.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimView<'a> {
    claim_id: u64,
    act_id: &'a str,
    ticket_id: &'a str,
    code: &'a str,
    claimed_at: Rfc3339Ms,
}

impl<'a> From<&'a Claim> for ClaimView<'a> {
    fn from(c: &'a Claim) -> Self {
        ClaimView {
            claim_id: c.id,
            act_id: &c.activity_id,
            ticket_id: &c.ticket_id,
            code: &c.code,
            claimed_at: Rfc3339Ms::new(c.claimed_at_ms),
        }
    }
}
