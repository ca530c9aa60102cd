//! One integration-test binary: every test starts the real `ticketd` and
//! talks to it over HTTP (see `common`).

mod common;

mod api;
mod browser;
mod cli;
mod cluster;
mod crash;
mod deploy;
mod hardening;
mod layout;
mod limits;
mod ops;
mod page;
mod queue;
mod reload;
mod report;
mod rush;
mod security;
mod workers;
