//! The values of the metrics' labels: one enum per label, each value's text written once.

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// A label value enum: its variants, their texts, `as_str` and its encoding.
macro_rules! label {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {

            /// The label's text (also the log's).
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}

label! {
    /// How a promote or rollback request ended (`result` of `handoff_promotions`).
    PromotionResult {
        /// Done and verified.
        Ok => "ok",
        /// Refused before anything changed.
        Refused => "refused",
        /// Failed on the kernel's or the daemon's side.
        Failed => "failed",
    }
}

/// How a generation was retired (`reason` of `handoff_retirements`): the lifecycle's
/// own account, its text written there once.
pub use crate::lifecycle::Retirement;

impl EncodeLabelValue for Retirement {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Why traffic went back to an earlier generation (`reason` of `handoff_rollbacks`).
pub use crate::lifecycle::RollbackReason;

impl EncodeLabelValue for RollbackReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

label! {
    /// What the steering watch saw (`reason` of `handoff_steering_watch`).
    SteeringWatch {
        /// A probe found a group without handoff's program.
        Lost => "lost",
        /// Attached again, confirmed by a probe.
        Restored => "restored",
    }
}

/// `a, b, c`: the values of a label, for a metric's help.
pub(super) fn listed(values: impl IntoIterator<Item = &'static str>) -> String {
    values.into_iter().collect::<Vec<_>>().join(", ")
}
