//! The registry HTTP API (OCI distribution) for pulls, on reqwest: GETs of manifests and
//! blobs, with the authentication challenge answered as registries expect it (`Bearer`:
//! a token from the realm for `repository:<repo>:pull`, with the pull's credentials if any;
//! `Basic`: the credentials themselves), each endpoint's extra headers, and failures mapped
//! to [`ImageError`]s that name the reference.

use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue, WWW_AUTHENTICATE};
use serde::Deserialize;

use super::Credentials;
use crate::image::ImageError;

/// What a `WWW-Authenticate` header asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params: Vec<(String, String)> = Vec::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.push((key, value));
        s = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
            scope: get("scope"),
        })
    } else if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else {
        None
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: String,
    #[serde(default)]
    access_token: String,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    #[serde(default)]
    errors: Vec<RegistryErrorEntry>,
}

#[derive(Deserialize)]
struct RegistryErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// One repository on one endpoint, for one pull.
pub struct Session {
    http: reqwest::Client,
    /// `scheme://host[:port]<api path>`, e.g. `https://127.0.0.1:5000/v2`.
    api: String,
    /// `host[:port]`, for messages.
    pub host: String,
    repository: String,
    headers: HeaderMap,
    creds: Credentials,
    /// The `Authorization` that worked (or the registry token given).
    authorization: Mutex<Option<HeaderValue>>,
    /// The reference as the user gave it, for messages.
    display: String,
    timeout: Duration,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        http: reqwest::Client,
        api: String,
        host: String,
        repository: String,
        headers: HeaderMap,
        creds: Credentials,
        display: String,
        timeout: Duration,
    ) -> Session {
        let authorization = (!creds.registry_token.is_empty())
            .then(|| HeaderValue::from_str(&format!("Bearer {}", creds.registry_token)).ok())
            .flatten();
        Session {
            http,
            api,
            host,
            repository,
            headers,
            creds,
            authorization: Mutex::new(authorization),
            display,
            timeout,
        }
    }

    fn stalled(&self, what: &str) -> ImageError {
        ImageError::Stalled {
            reference: self.display.clone(),
            reason: format!(
                "{what}: no answer from {} for {:?}",
                self.host, self.timeout
            ),
        }
    }

    /// A transport failure (connect, TLS, reset) as an error.
    pub fn request_error(&self, e: &reqwest::Error, what: &str) -> ImageError {
        let mut reason = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
        while let Some(s) = src {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            src = s.source();
        }
        if e.is_timeout() {
            ImageError::Stalled {
                reference: self.display.clone(),
                reason: format!("{what}: {reason}"),
            }
        } else {
            ImageError::Unavailable {
                reference: self.display.clone(),
                reason: format!("{}: {what}: {reason}", self.host),
            }
        }
    }

    fn basic(&self) -> Option<HeaderValue> {
        let (user, pass) = if !self.creds.identity_token.is_empty() {
            let user = if self.creds.username.is_empty() {
                "<token>"
            } else {
                &self.creds.username
            };
            (user, self.creds.identity_token.as_str())
        } else if !self.creds.username.is_empty() || !self.creds.password.is_empty() {
            (self.creds.username.as_str(), self.creds.password.as_str())
        } else {
            return None;
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        HeaderValue::from_str(&format!("Basic {b64}")).ok()
    }

    async fn send(
        &self,
        url: &str,
        header: Option<(HeaderName, &str)>,
        authorization: Option<HeaderValue>,
    ) -> Result<reqwest::Response, ImageError> {
        let mut req = self.http.get(url).headers(self.headers.clone());
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        if let Some(a) = authorization {
            req = req.header(AUTHORIZATION, a);
        }
        tokio::time::timeout(self.timeout, req.send())
            .await
            .map_err(|_| self.stalled(url))?
            .map_err(|e| self.request_error(&e, url))
    }

    /// Answers a challenge: the `Authorization` to retry with.
    async fn authorize(&self, challenge: &str) -> Result<HeaderValue, ImageError> {
        let unauthenticated = |reason: String| ImageError::Unauthenticated {
            reference: self.display.clone(),
            reason,
        };
        match parse_challenge(challenge) {
            Some(Challenge::Basic) => self.basic().ok_or_else(|| {
                unauthenticated(format!("{} asks for a user name and password", self.host))
            }),
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let scope = scope.unwrap_or_else(|| format!("repository:{}:pull", self.repository));
                let mut query: Vec<(&str, &str)> = vec![("scope", &scope)];
                if let Some(s) = &service {
                    query.push(("service", s));
                }
                let url = reqwest::Url::parse_with_params(&realm, &query)
                    .map_err(|e| unauthenticated(format!("token realm {realm:?}: {e}")))?;
                let resp = self.send(url.as_str(), None, self.basic()).await?;
                let status = resp.status();
                let body = tokio::time::timeout(self.timeout, resp.bytes())
                    .await
                    .map_err(|_| self.stalled(&realm))?
                    .map_err(|e| self.request_error(&e, &realm))?;
                if !status.is_success() {
                    return Err(unauthenticated(format!(
                        "{realm}: {status}: {}",
                        String::from_utf8_lossy(&body).trim()
                    )));
                }
                let t: TokenResponse = serde_json::from_slice(&body)
                    .map_err(|e| unauthenticated(format!("{realm}: bad token answer: {e}")))?;
                let token = if t.token.is_empty() {
                    t.access_token
                } else {
                    t.token
                };
                if token.is_empty() {
                    return Err(unauthenticated(format!("{realm}: no token in the answer")));
                }
                HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    unauthenticated(format!("{realm}: the token is not a header value"))
                })
            }
            None => Err(unauthenticated(format!(
                "{}: unsupported authentication challenge {challenge:?}",
                self.host
            ))),
        }
    }

    /// GETs `path` (under the API path) with authentication; the response is a success.
    pub async fn get(
        &self,
        path: &str,
        header: Option<(HeaderName, &str)>,
    ) -> Result<reqwest::Response, ImageError> {
        let url = format!("{}/{}/{path}", self.api, self.repository);
        let known = self
            .authorization
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        let had_auth = known.is_some();
        let mut resp = self.send(&url, header.clone(), known).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            match challenge {
                Some(c) if !had_auth || self.creds.registry_token.is_empty() => {
                    let auth = self.authorize(&c).await?;
                    if let Ok(mut slot) = self.authorization.lock() {
                        *slot = Some(auth.clone());
                    }
                    resp = self.send(&url, header, Some(auth)).await?;
                }
                _ => {}
            }
        }
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.status_error(&url, resp).await)
    }

    async fn status_error(&self, url: &str, resp: reqwest::Response) -> ImageError {
        let status = resp.status();
        let body = tokio::time::timeout(self.timeout, resp.bytes())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let envelope: Option<ErrorEnvelope> = serde_json::from_slice(&body).ok();
        let codes: Vec<&str> = envelope
            .as_ref()
            .map(|e| e.errors.iter().map(|x| x.code.as_str()).collect())
            .unwrap_or_default();
        let message = match &envelope {
            Some(e) if !e.errors.is_empty() => e
                .errors
                .iter()
                .map(|x| format!("{}: {}", x.code, x.message))
                .collect::<Vec<_>>()
                .join("; "),
            _ => String::from_utf8_lossy(&body)
                .trim()
                .chars()
                .take(200)
                .collect(),
        };
        let reason = format!("{url}: {status} {message}");
        let reference = self.display.clone();
        let not_found = codes.iter().any(|c| {
            matches!(
                *c,
                "MANIFEST_UNKNOWN" | "NAME_UNKNOWN" | "BLOB_UNKNOWN" | "NOT_FOUND"
            )
        });
        let denied = codes
            .iter()
            .any(|c| matches!(*c, "UNAUTHORIZED" | "DENIED"));
        if not_found || status == StatusCode::NOT_FOUND {
            ImageError::NotFound { reference, reason }
        } else if denied || status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            ImageError::Unauthenticated { reference, reason }
        } else if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            ImageError::Unavailable { reference, reason }
        } else {
            ImageError::Registry { reference, reason }
        }
    }

    /// Reads a whole (small) body, such as a manifest.
    /// Reads a whole (small) body such as a manifest, refusing one over `max` bytes without
    /// reading past the limit.
    pub async fn body(
        &self,
        resp: reqwest::Response,
        what: &str,
        max: usize,
    ) -> Result<Vec<u8>, ImageError> {
        let too_big = |n: u64| ImageError::BadManifest {
            reference: self.display.clone(),
            reason: format!("{what}: {n} bytes or more, over the limit of {max}"),
        };
        if let Some(n) = resp.content_length()
            && n > max as u64
        {
            return Err(too_big(n));
        }
        let read = async {
            let mut out = Vec::new();
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
                let chunk = chunk.map_err(|e| self.request_error(&e, what))?;
                if out.len() + chunk.len() > max {
                    return Err(too_big((out.len() + chunk.len()) as u64));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(out)
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| self.stalled(what))?
    }
}

/// The extra headers of an endpoint as a header map; bad names or values are errors.
pub fn header_map(headers: &[(String, String)]) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let n =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("header name {name:?}"))?;
        let v =
            HeaderValue::from_str(value).map_err(|_| format!("header {name:?} value {value:?}"))?;
        map.append(n, v);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused() {
        let rustls = super::super::tls::client_config(&Default::default()).expect("tls");
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(rustls)
            .build()
            .expect("client");
        let session = Session::new(
            http,
            "http://127.0.0.1:9/v2".to_string(),
            "127.0.0.1:9".to_string(),
            "r".to_string(),
            HeaderMap::new(),
            Credentials::default(),
            "127.0.0.1:9/r:1".to_string(),
            Duration::from_secs(5),
        );
        let chunked = |n: usize| {
            let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..n)
                .map(|_| Ok(bytes::Bytes::from(vec![b'x'; 1000])))
                .collect();
            reqwest::Response::from(http::Response::new(reqwest::Body::wrap_stream(
                futures_util::stream::iter(chunks),
            )))
        };
        let ok = session
            .body(chunked(4), "m", 4000)
            .await
            .expect("at the limit");
        assert_eq!(ok.len(), 4000);
        let e = session
            .body(chunked(5), "manifest v1", 4000)
            .await
            .expect_err("over the limit");
        assert!(e.to_string().contains("over the limit of 4000"), "{e}");
        let declared =
            reqwest::Response::from(http::Response::new(reqwest::Body::from(vec![b'x'; 5000])));
        let e = session
            .body(declared, "manifest v1", 4000)
            .await
            .expect_err("declared over the limit");
        assert!(e.to_string().contains("5000 bytes"), "{e}");
    }

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".to_string(),
                service: Some("registry.docker.io".to_string()),
                scope: Some("repository:library/busybox:pull".to_string()),
            })
        );
        assert_eq!(
            parse_challenge(r#"bearer realm="http://127.0.0.1:1/t", service=a\"b"#),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".to_string(),
                service: Some("a\\\"b".to_string()),
                scope: None,
            })
        );
        assert_eq!(
            parse_challenge(r#"Bearer realm="a\"q""#),
            Some(Challenge::Bearer {
                realm: "a\"q".to_string(),
                service: None,
                scope: None
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(r#"Bearer realm="unterminated"#), None);
    }

    #[test]
    fn headers() {
        let m = header_map(&[
            ("x-a".to_string(), "1".to_string()),
            ("x-a".to_string(), "2".to_string()),
        ])
        .expect("valid");
        assert_eq!(m.get_all("x-a").iter().count(), 2);
        assert!(header_map(&[("bad name".to_string(), "1".to_string())]).is_err());
    }
}
