//! Query strings, paths and bodies read the way Confluent's server reads them, with its
//! error bodies when they do not parse.
//!
//! axum's own extractors answer a bad query, path or body with plain text, which
//! Confluent's clients cannot parse; these wrappers answer with `{"error_code",
//! "message"}` instead. Query flags are read leniently because Confluent's server (JAX-RS)
//! takes `true`/`false` in any case, and its Python client sends Python's `True`/`False`.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};

use crate::error::ApiError;
use crate::state::Show;

/// Every query parameter any endpoint reads; each endpoint uses the ones it documents
/// and, like Confluent's server, ignores the rest (`format`, `reference_format`, ...).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Flags {
    /// Include soft-deleted subjects or versions.
    #[serde(deserialize_with = "lenient_bool")]
    pub deleted: bool,
    /// Only soft-deleted ones. Confluent's Python client spells it `deleted_only`.
    #[serde(deserialize_with = "lenient_bool", alias = "deleted_only")]
    pub deleted_only: bool,
    #[serde(deserialize_with = "lenient_bool")]
    pub permanent: bool,
    #[serde(deserialize_with = "lenient_bool")]
    pub verbose: bool,
    /// Accepted and ignored: schemas are always stored in canonical form.
    #[serde(deserialize_with = "lenient_bool")]
    pub normalize: bool,
    #[serde(deserialize_with = "lenient_bool")]
    pub default_to_global: bool,
    /// Accepted and ignored: the mode never changes (see `PUT /mode`).
    #[serde(deserialize_with = "lenient_bool")]
    pub force: bool,
    /// Restricts id lookups to one subject.
    pub subject: Option<String>,
    /// Restricts subject listings to names with this prefix; `:*:` means all.
    pub subject_prefix: Option<String>,
    /// Items to skip in a listing.
    pub offset: usize,
    /// Items to return at most; zero or negative means all, as Confluent's `-1`.
    pub limit: i64,
}

impl Flags {
    pub fn show(&self) -> Show {
        Show::from_flags(self.deleted, self.deleted_only)
    }

    /// `subjectPrefix`, where `:*:` (every context, the client default) is no filter.
    pub fn prefix(&self) -> Option<&str> {
        self.subject_prefix
            .as_deref()
            .filter(|p| !p.is_empty() && *p != ":*:")
    }

    /// The `offset`/`limit` page of a listing.
    pub fn page<T>(&self, items: Vec<T>) -> Vec<T> {
        let limit = usize::try_from(self.limit)
            .ok()
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        items.into_iter().skip(self.offset).take(limit).collect()
    }
}

/// `true`/`false` in any case; an empty value (`?deleted`) is false. Anything else is
/// refused rather than read as false, as Java's `Boolean.valueOf` would: a typo should
/// not silently list, or permanently delete, the wrong thing.
fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let s = String::deserialize(d)?;
    if s.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if s.is_empty() || s.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err(D::Error::custom(format!(
            "expected true or false, got {s:?}"
        )))
    }
}

/// The query string as [`Flags`].
pub struct Params(pub Flags);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Query::<Flags>::try_from_uri(&parts.uri)
            .map(|Query(f)| Params(f))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// Path parameters.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| ApiPath(t))
            .map_err(|e| ApiError::http(e.status(), e.body_text()))
    }
}

/// The request body, within the server's size limit.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|e| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::body_too_large(),
                status => ApiError::http(status, e.body_text()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(query: &str) -> Result<Flags, String> {
        let uri: axum::http::Uri = format!("/x?{query}").parse().unwrap();
        Query::<Flags>::try_from_uri(&uri)
            .map(|Query(f)| f)
            .map_err(|e| e.body_text())
    }

    #[test]
    fn booleans_in_any_case_as_confluent_reads_them() {
        for (q, want) in [
            ("deleted=true", true),
            ("deleted=True", true),
            ("deleted=TRUE", true),
            ("deleted=false", false),
            ("deleted=False", false),
            ("deleted=", false),
            ("deleted", false),
            ("", false),
        ] {
            assert_eq!(flags(q).unwrap().deleted, want, "{q}");
        }
        let err = flags("permanent=yes").unwrap_err();
        assert!(err.contains("expected true or false"), "{err}");
    }

    #[test]
    fn the_python_clients_queries_parse() {
        let f = flags("deleted=False&deleted_only=True&offset=1&limit=-1&subjectPrefix=a&format=serialized&normalize=False").unwrap();
        assert!(!f.deleted && f.deleted_only);
        assert_eq!(f.show(), Show::DeletedOnly);
        assert_eq!(f.prefix(), Some("a"));
        assert_eq!(f.page(vec![1, 2, 3]), vec![2, 3]);
        let f = flags("deletedOnly=true&limit=1&defaultToGlobal=True&subjectPrefix=:*:").unwrap();
        assert!(f.deleted_only && f.default_to_global);
        assert_eq!(f.prefix(), None);
        assert_eq!(f.page(vec![1, 2, 3]), vec![1]);
        assert!(flags("offset=-1").is_err());
    }
}
