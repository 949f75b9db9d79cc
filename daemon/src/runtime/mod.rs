//! The daemon at work: its table of services and the event loop that drives their
//! lifecycles, the control socket, metrics, and the start-up that assembles them.

pub mod cleanup;
pub mod control;
pub mod daemon;
pub mod metrics;
pub mod notify;
pub mod readiness;
pub mod run;
pub mod scrape;
pub mod service;
pub mod supervise;
