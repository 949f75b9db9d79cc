//! The daemon's state and its answer to each control request.

use handoff_common::proto::{ErrorKind, ErrorReply, Request, Response, Status};

use crate::generation::{Service, ServiceConfig};

/// Every service of the daemon.
#[derive(Debug)]
pub struct Daemon {
    services: Vec<Service>,
}

impl Daemon {
    /// A daemon steering `services`; nothing touches the kernel until a promote.
    pub fn new(services: Vec<ServiceConfig>) -> Self {
        Self {
            services: services.into_iter().map(Service::new).collect(),
        }
    }

    /// Answers one request.
    pub fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Promote { pid, service } => match self.service(service.as_deref()) {
                Ok(s) => s
                    .promote(pid)
                    .map_or_else(|e| error(e.kind(), &one_line(&e)), Response::Promoted),
                Err(e) => e,
            },
            Request::Rollback { service } => match self.service(service.as_deref()) {
                Ok(s) => s
                    .rollback()
                    .map_or_else(|e| error(e.kind(), &one_line(&e)), Response::Promoted),
                Err(e) => e,
            },
            Request::Status {} => {
                let mut status = Status::default();
                for s in &mut self.services {
                    match s.status() {
                        Ok(st) => status.services.push(st),
                        Err(e) => return error(ErrorKind::Internal, &one_line(&e)),
                    }
                }
                Response::Status(status)
            }
        }
    }

    fn service(&mut self, name: Option<&str>) -> Result<&mut Service, Response> {
        let names = || self_names(&self.services);
        match name {
            Some(name) => {
                let known = names();
                self.services
                    .iter_mut()
                    .find(|s| s.name() == name)
                    .ok_or_else(|| {
                        error(
                            ErrorKind::UnknownService,
                            &format!("no service {name:?} (this daemon runs: {known})"),
                        )
                    })
            }
            None if self.services.len() == 1 => Ok(&mut self.services[0]),
            None => {
                let known = names();
                Err(error(
                    ErrorKind::UnknownService,
                    &format!(
                        "this daemon runs several services ({known}): name one with --service"
                    ),
                ))
            }
        }
    }
}

fn self_names(services: &[Service]) -> String {
    services
        .iter()
        .map(Service::name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A refusal as the protocol carries it: the error and its causes on one line.
pub fn error(kind: ErrorKind, e: &dyn std::fmt::Display) -> Response {
    Response::Error(ErrorReply {
        kind,
        message: e.to_string(),
    })
}

/// An error and its chain of causes as one line (`what: why: root cause`).
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}
