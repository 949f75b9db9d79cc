//! The generation lifecycle of one service, as a pure state machine: events in
//! ([`Event`]: a promote asked for, an effect's outcome, a count, a deadline, an exit),
//! effects out ([`Effect`]: insert sockets, publish a steering record, probe, signal,
//! count, persist), applied by the runtime, which reports each fallible effect's outcome
//! back as an event. No I/O, no clock (the time is an argument), no kernel handle: every
//! transition is tested without root (see `tests`).
//!
//! Only this module changes a generation's state. A multi-step operation (a promote
//! touching several groups) runs one fallible effect at a time; when one fails, the
//! machine decides the undo and answers the operation with the reason.

mod drain;
mod event;
mod model;
mod operation;
mod promote;
#[cfg(test)]
mod replay;
mod service;
#[cfg(test)]
mod tests;

pub use drain::resumed;
#[cfg(test)]
use event::{Check, Promoted};
pub use event::{
    Effect, Event, Failure, Outcome, ProbeSeen, PromoteMode, Refusal, Reply, RollbackReason,
    SignalScope, Why,
};
pub use model::{
    Block, Drain, GenId, Generation, Millis, Phase, Policy, RetireReason, Retirement, Span, Steer,
};
pub use service::Lifecycle;
