//! Confluent's error bodies: `{"error_code": 40401, "message": "..."}` with the HTTP
//! status its first three digits name.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::api::json;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: u32,
    pub message: String,
}

impl ApiError {
    fn new(code: u32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn subject_not_found(subject: &str) -> Self {
        Self::new(40401, format!("Subject '{subject}' not found."))
    }
    pub fn version_not_found(version: &str) -> Self {
        Self::new(40402, format!("Version {version} not found."))
    }
    pub fn schema_not_found() -> Self {
        Self::new(40403, "Schema not found")
    }
    pub fn subject_not_soft_deleted(subject: &str) -> Self {
        Self::new(
            40405,
            format!("Subject '{subject}' was not deleted first before being permanently deleted"),
        )
    }
    pub fn version_not_soft_deleted(subject: &str, version: u32) -> Self {
        Self::new(
            40407,
            format!(
                "Subject '{subject}' Version {version} was not deleted first before being permanently deleted"
            ),
        )
    }
    pub fn subject_config_not_found(subject: &str) -> Self {
        Self::new(
            40408,
            format!("Subject '{subject}' does not have subject-level compatibility configured"),
        )
    }
    pub fn incompatible(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }
    pub fn invalid_schema(message: impl Into<String>) -> Self {
        Self::new(42201, message)
    }
    pub fn invalid_version(version: &str) -> Self {
        Self::new(
            42202,
            format!(
                "The specified version '{version}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
            ),
        )
    }
    pub fn invalid_compatibility_level(message: impl Into<String>) -> Self {
        Self::new(42203, message)
    }
    pub fn invalid_mode(mode: &str) -> Self {
        Self::new(
            42204,
            format!(
                "Invalid mode {mode:?}; valid values are IMPORT, READONLY, READWRITE and READONLY_OVERRIDE"
            ),
        )
    }
    pub fn operation_not_permitted(message: impl Into<String>) -> Self {
        Self::new(42205, message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }
    /// A plain HTTP error (`error_code` is the status), as Confluent's server answers
    /// requests that never reach a resource: no route, wrong method, unreadable path.
    pub fn http(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(u32::from(status.as_u16()), message)
    }
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized")
    }
    pub fn body_too_large() -> Self {
        Self::new(
            413,
            "Request body is larger than this registry accepts (--max-body-bytes)",
        )
    }
    pub fn store(message: impl Into<String>) -> Self {
        Self::new(50001, message)
    }

    pub fn status(&self) -> StatusCode {
        let http = if self.code < 1000 {
            self.code
        } else {
            self.code / 100
        };
        StatusCode::from_u16(http as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.code >= 50000 {
            tracing::error!(code = self.code, message = %self.message, "registry error");
        }
        json(
            self.status(),
            &serde_json::json!({"error_code": self.code, "message": self.message}),
        )
    }
}
