//! Optional HTTP basic auth on every endpoint.
//!
//! Given credentials (`--basic-auth USER:PASSWORD`, or better the environment variable
//! `LANES_REGISTRY_BASIC_AUTH`, whose value `ps` does not show), the server answers any
//! request that lacks them with 401 and `WWW-Authenticate: Basic`, the challenge that
//! Confluent's clients answer with their `basic.auth.user.info`.
//!
//! The password is kept only inside the expected `Authorization` value, is never
//! logged, and `Debug` hides it. Headers are compared in time that does not depend on
//! where they first differ, so timing does not reveal how much of a guess was right.

use std::fmt;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Why credentials given to the server are unusable. Never includes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("basic auth credentials must be USER:PASSWORD; no ':' found")]
    NoColon,
    #[error("basic auth user must not be empty")]
    EmptyUser,
}

/// The one user and password the server accepts.
#[derive(Clone)]
pub struct Credentials {
    user: String,
    /// Base64 of `user:password`, without padding, as the header carries it.
    expected: String,
}

impl Credentials {
    /// Parses `USER:PASSWORD`; the password may itself contain `:`, the user may not
    /// (RFC 7617).
    pub fn parse(user_password: &str) -> Result<Self, CredentialsError> {
        let (user, _) = user_password
            .split_once(':')
            .ok_or(CredentialsError::NoColon)?;
        if user.is_empty() {
            return Err(CredentialsError::EmptyUser);
        }
        Ok(Self {
            user: user.to_string(),
            expected: base64(user_password.as_bytes())
                .trim_end_matches('=')
                .to_string(),
        })
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// Whether an `Authorization` header carries these credentials.
    pub fn accepts(&self, header: Option<&HeaderValue>) -> bool {
        let Some(value) = header.and_then(|h| h.to_str().ok()) else {
            return false;
        };
        let Some((scheme, token)) = value.trim().split_once(' ') else {
            return false;
        };
        scheme.eq_ignore_ascii_case("basic")
            && same(
                token.trim().trim_end_matches('=').as_bytes(),
                self.expected.as_bytes(),
            )
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Equal bytes, compared without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Standard base64 with padding (RFC 4648), all basic auth needs; not worth a crate.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let mut three = [0u8; 3];
        three[..chunk.len()].copy_from_slice(chunk);
        let n = u32::from(three[0]) << 16 | u32::from(three[1]) << 8 | u32::from(three[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Middleware: passes requests with the credentials, answers the rest with 401.
pub(crate) async fn require(
    State(credentials): State<Arc<Credentials>>,
    request: Request,
    next: Next,
) -> Response {
    if credentials.accepts(request.headers().get(header::AUTHORIZATION)) {
        return next.run(request).await;
    }
    // The header is not logged: a near-miss guess is most of a password.
    tracing::debug!(method = %request.method(), path = %request.uri().path(), "request without valid credentials");
    let mut response = ApiError::unauthorized().into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"lanes-schema-registry\""),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain}");
        }
    }

    #[test]
    fn accepts_only_the_exact_credentials() {
        let c = Credentials::parse("Aladdin:open sesame").unwrap();
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert!(c.accepts(Some(&h("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="))));
        assert!(c.accepts(Some(&h("basic QWxhZGRpbjpvcGVuIHNlc2FtZQ"))));
        assert!(!c.accepts(None));
        assert!(!c.accepts(Some(&h("Basic QWxhZGRpbjpvcGVuIHNlc2FtZA=="))));
        assert!(!c.accepts(Some(&h("Bearer QWxhZGRpbjpvcGVuIHNlc2FtZQ=="))));
        assert!(!c.accepts(Some(&h("Basic"))));
        assert!(!c.accepts(Some(&h(""))));
    }

    #[test]
    fn parse_keeps_colons_in_the_password_and_never_shows_it() {
        let c = Credentials::parse("u:p:w").unwrap();
        assert_eq!(c.user(), "u");
        assert_eq!(c.expected, base64(b"u:p:w").trim_end_matches('='));
        assert!(!format!("{c:?}").contains("p:w"));
        assert_eq!(
            Credentials::parse("nopassword").unwrap_err(),
            CredentialsError::NoColon
        );
        assert_eq!(
            Credentials::parse(":secret").unwrap_err(),
            CredentialsError::EmptyUser
        );
        assert!(
            !CredentialsError::EmptyUser.to_string().contains("secret"),
            "errors never echo the value"
        );
    }
}
