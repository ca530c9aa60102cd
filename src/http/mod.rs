//! The HTTP API: the seed's paths, JSON in and out.
//!
//! - [`server`] accepts connections and applies connection-level limits; it
//!   owns the connection count and the drain ([`server::Http`]);
//! - [`lanes`] are the single-threaded runtimes public connections live on;
//! - [`router`] maps a request to its handler and counts it;
//! - [`request`] reads bodies, queries and credentials, refusing bad input
//!   with 4xx answers;
//! - [`error`] owns the error shape and status mapping;
//! - `json` renders answers' JSON into a buffer each thread keeps, so an
//!   answer costs one allocation of its own size;
//! - `handlers` hold one module per area (`act`, `ticket`, `user`, `queue`,
//!   `admin`, `ops`) and `page`, the fans' page (`web/`, embedded by
//!   `build.rs`);
//! - `streaming` serves waiting rooms' event streams beside hyper, on a
//!   fraction of a hyper connection's memory;
//! - `write_deadline` lets go of a client that stops reading its answers
//!   (`server.write_timeout`), on both paths;
//! - `parse_errors` gives the answers hyper makes itself to requests it
//!   cannot parse the JSON error shape;
//! - [`access_log`] writes one JSON line per request, off the request path.

pub mod access_log;
pub mod error;
mod handlers;
mod json;
pub mod lanes;
mod parse_errors;
pub mod request;
pub mod router;
pub mod server;
mod streaming;
mod write_deadline;

pub use error::ApiError;
