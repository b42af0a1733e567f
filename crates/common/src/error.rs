//! The one question every failure in a Lanes service must answer: will it pass?
//!
//! [`Failure::Poison`] will not: the input is dead-lettered with its class and the
//! service goes on. [`Failure::Transient`] may: the work is retried with backoff
//! ([`crate::retry`]) and never dead-lettered; if the service must stop meanwhile, the
//! input stays uncommitted and is replayed. [`Failure::Fatal`] is for what only an
//! operator or a restart can cure: the service stops without committing.

use rdkafka::error::KafkaError;

use crate::avro::{DecodeError, EncodeError};
use crate::dlq::ErrorClass;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    #[error("{class}: {message}")]
    Poison { class: ErrorClass, message: String },
    #[error("transient: {0}")]
    Transient(String),
    #[error("fatal: {0}")]
    Fatal(String),
}

impl Failure {
    pub fn poison(class: ErrorClass, message: impl Into<String>) -> Self {
        Failure::Poison {
            class,
            message: message.into(),
        }
    }

    pub fn transient(message: impl Into<String>) -> Self {
        Failure::Transient(message.into())
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Failure::Fatal(message.into())
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, Failure::Transient(_))
    }

    /// A produce error: the record itself or its destination is at fault (too large,
    /// invalid or unauthorized topic) -> poison; the broker or the network -> transient.
    pub fn from_produce(e: &KafkaError) -> Self {
        use rdkafka::types::RDKafkaErrorCode as C;
        match e.rdkafka_error_code() {
            Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => {
                Failure::poison(ErrorClass::TooLarge, e.to_string())
            }
            Some(
                C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidRecord
                | C::InvalidTopic
                | C::UnknownTopicOrPartition
                | C::UnknownTopic
                | C::UnknownPartition
                | C::InvalidRequiredAcks
                | C::PolicyViolation,
            ) => Failure::poison(ErrorClass::ProduceError, e.to_string()),
            _ => Failure::transient(e.to_string()),
        }
    }
}

impl From<DecodeError> for Failure {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Poison { class, message } => Failure::Poison { class, message },
            DecodeError::Transient(m) => Failure::Transient(m),
        }
    }
}

impl From<EncodeError> for Failure {
    /// Our own records fail to encode only when the registry is unreachable (transient)
    /// or refuses the schema (an operator must act).
    fn from(e: EncodeError) -> Self {
        if e.retriable {
            Failure::Transient(e.message)
        } else {
            Failure::Fatal(e.message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode as C;

    #[test]
    fn produce_errors_a_restart_cannot_cure_are_poison() {
        let too_large = KafkaError::MessageProduction(C::MessageSizeTooLarge);
        assert!(matches!(
            Failure::from_produce(&too_large),
            Failure::Poison {
                class: ErrorClass::TooLarge,
                ..
            }
        ));
        for code in [
            C::TopicAuthorizationFailed,
            C::InvalidTopic,
            C::UnknownTopic,
        ] {
            assert!(matches!(
                Failure::from_produce(&KafkaError::MessageProduction(code)),
                Failure::Poison {
                    class: ErrorClass::ProduceError,
                    ..
                }
            ));
        }
        for code in [
            C::MessageTimedOut,
            C::BrokerTransportFailure,
            C::AllBrokersDown,
        ] {
            assert!(Failure::from_produce(&KafkaError::MessageProduction(code)).is_transient());
        }
    }
}
