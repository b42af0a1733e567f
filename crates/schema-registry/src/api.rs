//! The subset of Confluent's Schema Registry REST API that Confluent's clients (Java,
//! Python, librdkafka-based) and `schema_registry_converter` use, with Confluent's
//! paths, bodies, error codes and content type.
//!
//! Requests pass the basic-auth check ([`crate::auth`], when credentials are set) and
//! the body-size limit, then a handler here reads them with [`crate::params`] and calls
//! [`Store`]. Config, mode and compatibility endpoints live in [`crate::config_api`].

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::ServerOptions;
use crate::config_api;
use crate::error::ApiError;
use crate::params::{ApiPath, Body, Params};
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

pub(crate) fn ok(body: Value) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, &body))
}

pub(crate) type ApiResult = Result<Response, ApiError>;
pub(crate) type AppState = Arc<Store>;

/// The API with the default [`ServerOptions`]: 1 MiB bodies, no auth.
pub fn router(store: Arc<Store>) -> Router {
    router_with(store, &ServerOptions::default())
}

pub fn router_with(store: Arc<Store>, options: &ServerOptions) -> Router {
    let routes = Router::new()
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
        .route(
            "/subjects/{subject}/versions/{version}/referencedby",
            get(referenced_by),
        )
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/versions", get(id_versions))
        .route("/schemas/ids/{id}/subjects", get(id_subjects))
        .route(
            "/schemas/types",
            get(|| async { json(StatusCode::OK, &json!(["AVRO"])) }),
        )
        // One context, Confluent's default.
        .route("/contexts", get(contexts));
    let mut app = config_api::routes(routes)
        .fallback(|| async { ApiError::http(StatusCode::NOT_FOUND, "HTTP 404 Not Found") })
        .method_not_allowed_fallback(|| async {
            ApiError::http(
                StatusCode::METHOD_NOT_ALLOWED,
                "HTTP 405 Method Not Allowed",
            )
        })
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .with_state(store);
    // Added last so it runs first: an unauthenticated body is never read.
    if let Some(credentials) = &options.basic_auth {
        app = app.layer(middleware::from_fn_with_state(
            Arc::new(credentials.clone()),
            crate::auth::require,
        ));
    }
    app
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

pub(crate) fn schema_body(body: &[u8]) -> Result<String, ApiError> {
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

async fn list_subjects(State(store): State<AppState>, Params(f): Params) -> ApiResult {
    ok(json!(f.page(store.subjects(f.show(), f.prefix()))))
}

async fn register(
    State(store): State<AppState>,
    ApiPath(subject): ApiPath<String>,
    Params(_): Params,
    Body(body): Body,
) -> ApiResult {
    let schema = schema_body(&body)?;
    let id = store.register(&subject, &schema)?;
    ok(json!({ "id": id }))
}

async fn lookup(
    State(store): State<AppState>,
    ApiPath(subject): ApiPath<String>,
    Params(f): Params,
    Body(body): Body,
) -> ApiResult {
    let schema = schema_body(&body)?;
    ok(json!(store.lookup(&subject, &schema, f.deleted)?))
}

async fn delete_subject(
    State(store): State<AppState>,
    ApiPath(subject): ApiPath<String>,
    Params(f): Params,
) -> ApiResult {
    ok(json!(store.delete_subject(&subject, f.permanent)?))
}

async fn list_versions(
    State(store): State<AppState>,
    ApiPath(subject): ApiPath<String>,
    Params(f): Params,
) -> ApiResult {
    ok(json!(f.page(store.versions(&subject, f.show())?)))
}

async fn get_version(
    State(store): State<AppState>,
    ApiPath((subject, version)): ApiPath<(String, String)>,
    Params(f): Params,
) -> ApiResult {
    let spec = VersionSpec::parse(&version)?;
    ok(json!(store.version(&subject, spec, f.deleted)?))
}

async fn get_version_schema(
    State(store): State<AppState>,
    ApiPath((subject, version)): ApiPath<(String, String)>,
    Params(f): Params,
) -> ApiResult {
    let spec = VersionSpec::parse(&version)?;
    raw(store.version(&subject, spec, f.deleted)?.schema)
}

async fn delete_version(
    State(store): State<AppState>,
    ApiPath((subject, version)): ApiPath<(String, String)>,
    Params(f): Params,
) -> ApiResult {
    let spec = VersionSpec::parse(&version)?;
    ok(json!(store.delete_version(&subject, spec, f.permanent)?))
}

async fn referenced_by(
    State(store): State<AppState>,
    ApiPath((subject, version)): ApiPath<(String, String)>,
    Params(f): Params,
) -> ApiResult {
    let spec = VersionSpec::parse(&version)?;
    ok(json!(f.page(store.referenced_by(&subject, spec)?)))
}

async fn schema_by_id(State(store): State<AppState>, ApiPath(id): ApiPath<u32>) -> ApiResult {
    ok(json!({ "schema": store.schema_by_id(id)? }))
}

async fn raw_schema_by_id(State(store): State<AppState>, ApiPath(id): ApiPath<u32>) -> ApiResult {
    raw(store.schema_by_id(id)?)
}

fn raw(schema: String) -> ApiResult {
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], schema).into_response())
}

async fn id_versions(
    State(store): State<AppState>,
    ApiPath(id): ApiPath<u32>,
    Params(f): Params,
) -> ApiResult {
    let pairs: Vec<Value> = store
        .id_versions(id, f.subject.as_deref(), f.deleted)?
        .into_iter()
        .map(|(subject, version)| json!({"subject": subject, "version": version}))
        .collect();
    ok(json!(f.page(pairs)))
}

async fn id_subjects(
    State(store): State<AppState>,
    ApiPath(id): ApiPath<u32>,
    Params(f): Params,
) -> ApiResult {
    let mut subjects: Vec<String> = store
        .id_versions(id, f.subject.as_deref(), f.deleted)?
        .into_iter()
        .map(|(subject, _)| subject)
        .collect();
    // Pairs come grouped by subject, in order.
    subjects.dedup();
    ok(json!(f.page(subjects)))
}

async fn contexts(Params(f): Params) -> ApiResult {
    ok(json!(f.page(vec!["."])))
}
