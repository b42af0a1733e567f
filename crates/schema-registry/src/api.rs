//! The subset of Confluent's Schema Registry REST API that Confluent's clients (Java,
//! Python, librdkafka-based) and `schema_registry_converter` use, with Confluent's
//! paths, bodies, error codes and content type.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::compat::Level;
use crate::error::ApiError;
use crate::store::{Store, VersionSpec};

pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// A JSON response with Confluent's content type.
pub fn json(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        body.to_string(),
    )
        .into_response()
}

fn ok(body: Value) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, &body))
}

type ApiResult = Result<Response, ApiError>;
type AppState = Arc<Store>;

pub fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/", get(|| async { json(StatusCode::OK, &json!({})) }))
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route(
            "/subjects/{subject}/versions",
            get(list_versions).post(register),
        )
        .route(
            "/subjects/{subject}/versions/{version}",
            get(get_version).delete(delete_version),
        )
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(get_version_schema),
        )
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/versions", get(id_versions))
        .route(
            "/schemas/types",
            get(|| async { json(StatusCode::OK, &json!(["AVRO"])) }),
        )
        .route("/config", get(get_global_config).put(put_global_config))
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
        .route(
            "/mode",
            get(|| async { json(StatusCode::OK, &json!({"mode": "READWRITE"})) }),
        )
        .with_state(store)
}

#[derive(Debug, Default, Deserialize)]
struct Flags {
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    permanent: bool,
    #[serde(default)]
    verbose: bool,
    #[serde(default, rename = "defaultToGlobal")]
    default_to_global: bool,
}

/// A request body with a schema. Clients send any of Confluent's content types (or
/// none), so the body is parsed as JSON whatever the header says; unknown properties
/// (`metadata`, `ruleSet`) are accepted and ignored.
#[derive(Debug, Deserialize)]
struct SchemaBody {
    schema: String,
    #[serde(default, rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Option<Vec<Value>>,
}

fn schema_body(body: &Bytes) -> Result<String, ApiError> {
    let b: SchemaBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))?;
    if let Some(t) = b
        .schema_type
        .as_deref()
        .filter(|t| !t.eq_ignore_ascii_case("AVRO"))
    {
        return Err(ApiError::invalid_schema(format!(
            "Unsupported schema type {t}; this registry stores AVRO only"
        )));
    }
    if b.references.as_ref().is_some_and(|r| !r.is_empty()) {
        return Err(ApiError::invalid_schema(
            "Schema references are not supported by this registry",
        ));
    }
    Ok(b.schema)
}

async fn list_subjects(State(store): State<AppState>, Query(f): Query<Flags>) -> ApiResult {
    ok(json!(store.subjects(f.deleted)))
}

async fn register(
    State(store): State<AppState>,
    Path(subject): Path<String>,
    body: Bytes,
) -> ApiResult {
    let schema = schema_body(&body)?;
    let id = store.register(&subject, &schema)?;
    ok(json!({ "id": id }))
}

async fn lookup(
    State(store): State<AppState>,
    Path(subject): Path<String>,
    Query(f): Query<Flags>,
    body: Bytes,
) -> ApiResult {
    let schema = schema_body(&body)?;
    ok(json!(store.lookup(&subject, &schema, f.deleted)?))
}

async fn delete_subject(
    State(store): State<AppState>,
    Path(subject): Path<String>,
    Query(f): Query<Flags>,
) -> ApiResult {
    ok(json!(store.delete_subject(&subject, f.permanent)?))
}

async fn list_versions(
    State(store): State<AppState>,
    Path(subject): Path<String>,
    Query(f): Query<Flags>,
) -> ApiResult {
    ok(json!(store.versions(&subject, f.deleted)?))
}

async fn get_version(
    State(store): State<AppState>,
    Path((subject, version)): Path<(String, String)>,
    Query(f): Query<Flags>,
) -> ApiResult {
    let spec = VersionSpec::parse(&version)?;
    ok(json!(store.version(&subject, spec, f.deleted)?))
}

async fn get_version_schema(
    State(store): State<AppState>,
    Path((subject, version)): Path<(String, String)>,
) -> ApiResult {
    let spec = VersionSpec::parse(&version)?;
    raw(store.version(&subject, spec, false)?.schema)
}

async fn delete_version(
    State(store): State<AppState>,
    Path((subject, version)): Path<(String, String)>,
    Query(f): Query<Flags>,
) -> ApiResult {
    let spec = VersionSpec::parse(&version)?;
    ok(json!(store.delete_version(&subject, spec, f.permanent)?))
}

async fn schema_by_id(State(store): State<AppState>, Path(id): Path<u32>) -> ApiResult {
    ok(json!({ "schema": store.schema_by_id(id)? }))
}

async fn raw_schema_by_id(State(store): State<AppState>, Path(id): Path<u32>) -> ApiResult {
    raw(store.schema_by_id(id)?)
}

fn raw(schema: String) -> ApiResult {
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], schema).into_response())
}

async fn id_versions(State(store): State<AppState>, Path(id): Path<u32>) -> ApiResult {
    let pairs: Vec<Value> = store
        .id_versions(id)?
        .into_iter()
        .map(|(subject, version)| json!({"subject": subject, "version": version}))
        .collect();
    ok(json!(pairs))
}

#[derive(Debug, Deserialize)]
struct ConfigBody {
    compatibility: String,
}

fn level_body(body: &Bytes) -> Result<Level, ApiError> {
    let b: ConfigBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))?;
    b.compatibility
        .parse()
        .map_err(ApiError::invalid_compatibility_level)
}

async fn get_global_config(State(store): State<AppState>) -> ApiResult {
    ok(json!({ "compatibilityLevel": store.level(None).unwrap_or(Level::Backward) }))
}

async fn put_global_config(State(store): State<AppState>, body: Bytes) -> ApiResult {
    let level = level_body(&body)?;
    store.set_level(None, Some(level))?;
    ok(json!({ "compatibility": level }))
}

async fn get_subject_config(
    State(store): State<AppState>,
    Path(subject): Path<String>,
    Query(f): Query<Flags>,
) -> ApiResult {
    match store.level(Some(&subject)) {
        Some(level) => ok(json!({ "compatibilityLevel": level })),
        None if f.default_to_global => ok(json!({ "compatibilityLevel": store.level(None) })),
        None => Err(ApiError::subject_config_not_found(&subject)),
    }
}

async fn put_subject_config(
    State(store): State<AppState>,
    Path(subject): Path<String>,
    body: Bytes,
) -> ApiResult {
    let level = level_body(&body)?;
    store.set_level(Some(&subject), Some(level))?;
    ok(json!({ "compatibility": level }))
}

async fn delete_subject_config(
    State(store): State<AppState>,
    Path(subject): Path<String>,
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
    Path(subject): Path<String>,
    Query(f): Query<Flags>,
    body: Bytes,
) -> ApiResult {
    let schema = schema_body(&body)?;
    compatibility(store.check(&subject, None, &schema)?, f.verbose)
}

async fn check_version(
    State(store): State<AppState>,
    Path((subject, version)): Path<(String, String)>,
    Query(f): Query<Flags>,
    body: Bytes,
) -> ApiResult {
    let spec = VersionSpec::parse(&version)?;
    let schema = schema_body(&body)?;
    compatibility(store.check(&subject, Some(spec), &schema)?, f.verbose)
}
