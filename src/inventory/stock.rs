//! What is left of an activity, as the API, the admin page and `/metrics`
//! show it.

/// What is left of one activity: the numbers `/act/list`, `/act/detail`,
/// `/admin` and `/metrics` show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stock {
    /// Codes not claimed, all ticket types.
    pub remaining: usize,
    /// Codes claimed.
    pub claimed: usize,
    /// Per ticket type, in the order asked: `(total, remaining)`.
    pub tickets: Vec<(usize, usize)>,
}
