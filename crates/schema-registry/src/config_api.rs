//! Confluent's config, mode and compatibility endpoints.
//!
//! Config holds only the compatibility level (global, or per subject over the global
//! one). The mode is fixed at READWRITE: the endpoints answer so, accept setting it to
//! READWRITE, and refuse IMPORT and READONLY, which this registry does not implement.

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::api::{ApiResult, AppState, ok, schema_body};
use crate::compat::Level;
use crate::error::ApiError;
use crate::params::{ApiPath, Body, Params};
use crate::store::VersionSpec;

pub(crate) fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route(
            "/config",
            get(get_global_config)
                .put(put_global_config)
                .delete(delete_global_config),
        )
        .route(
            "/config/{subject}",
            get(get_subject_config)
                .put(put_subject_config)
                .delete(delete_subject_config),
        )
        .route(
            "/compatibility/subjects/{subject}/versions",
            post(check_all),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(check_version),
        )
        .route("/mode", get(get_mode).put(put_global_mode))
        .route(
            "/mode/{subject}",
            get(get_mode).put(put_subject_mode).delete(get_mode),
        )
}

/// `PUT /config` bodies: Confluent's clients send `compatibility`; the Python client's
/// `set_config` may send `compatibilityLevel`, the name `GET /config` answers with.
/// Other settings (`normalize`, metadata, rule sets) are not kept and are ignored.
#[derive(Debug, Deserialize)]
struct ConfigBody {
    compatibility: Option<String>,
    #[serde(rename = "compatibilityLevel")]
    compatibility_level: Option<String>,
}

fn level_body(body: &[u8]) -> Result<Level, ApiError> {
    let b: ConfigBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))?;
    b.compatibility
        .or(b.compatibility_level)
        .ok_or_else(|| {
            ApiError::invalid_compatibility_level(
                "Invalid compatibility level: the body names no \"compatibility\"",
            )
        })?
        .parse()
        .map_err(ApiError::invalid_compatibility_level)
}

async fn get_global_config(State(store): State<AppState>) -> ApiResult {
    ok(json!({ "compatibilityLevel": store.level(None).unwrap_or(Level::Backward) }))
}

async fn put_global_config(State(store): State<AppState>, Body(body): Body) -> ApiResult {
    let level = level_body(&body)?;
    store.set_level(None, Some(level))?;
    ok(json!({ "compatibility": level }))
}

/// Restores the default level and answers with the one it replaced.
async fn delete_global_config(State(store): State<AppState>) -> ApiResult {
    let old = store.level(None).unwrap_or(Level::Backward);
    store.set_level(None, None)?;
    ok(json!({ "compatibilityLevel": old }))
}

async fn get_subject_config(
    State(store): State<AppState>,
    ApiPath(subject): ApiPath<String>,
    Params(f): Params,
) -> ApiResult {
    match store.level(Some(&subject)) {
        Some(level) => ok(json!({ "compatibilityLevel": level })),
        None if f.default_to_global => ok(json!({ "compatibilityLevel": store.level(None) })),
        None => Err(ApiError::subject_config_not_found(&subject)),
    }
}

async fn put_subject_config(
    State(store): State<AppState>,
    ApiPath(subject): ApiPath<String>,
    Body(body): Body,
) -> ApiResult {
    let level = level_body(&body)?;
    store.set_level(Some(&subject), Some(level))?;
    ok(json!({ "compatibility": level }))
}

async fn delete_subject_config(
    State(store): State<AppState>,
    ApiPath(subject): ApiPath<String>,
) -> ApiResult {
    let level = store
        .level(Some(&subject))
        .ok_or_else(|| ApiError::subject_config_not_found(&subject))?;
    store.set_level(Some(&subject), None)?;
    ok(json!({ "compatibilityLevel": level }))
}

fn compatibility(messages: Vec<String>, verbose: bool) -> ApiResult {
    let mut body = json!({ "is_compatible": messages.is_empty() });
    if verbose {
        body["messages"] = json!(messages);
    }
    ok(body)
}

async fn check_all(
    State(store): State<AppState>,
    ApiPath(subject): ApiPath<String>,
    Params(f): Params,
    Body(body): Body,
) -> ApiResult {
    let schema = schema_body(&body)?;
    compatibility(store.check(&subject, None, &schema)?, f.verbose)
}

async fn check_version(
    State(store): State<AppState>,
    ApiPath((subject, version)): ApiPath<(String, String)>,
    Params(f): Params,
    Body(body): Body,
) -> ApiResult {
    let spec = VersionSpec::parse(&version)?;
    let schema = schema_body(&body)?;
    compatibility(store.check(&subject, Some(spec), &schema)?, f.verbose)
}

const READWRITE: &str = "READWRITE";

/// The mode, global or of any subject, and what deleting a subject's mode leaves.
async fn get_mode() -> ApiResult {
    ok(json!({ "mode": READWRITE }))
}

#[derive(Debug, Deserialize)]
struct ModeBody {
    mode: String,
}

fn set_mode(body: &[u8]) -> ApiResult {
    let b: ModeBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))?;
    match b.mode.to_ascii_uppercase().as_str() {
        READWRITE => ok(json!({ "mode": READWRITE })),
        "IMPORT" | "READONLY" | "READONLY_OVERRIDE" => {
            Err(ApiError::operation_not_permitted(format!(
                "Mode {} is not supported: this registry is always READWRITE",
                b.mode
            )))
        }
        _ => Err(ApiError::invalid_mode(&b.mode)),
    }
}

async fn put_global_mode(Body(body): Body) -> ApiResult {
    set_mode(&body)
}

async fn put_subject_mode(ApiPath(_subject): ApiPath<String>, Body(body): Body) -> ApiResult {
    set_mode(&body)
}
