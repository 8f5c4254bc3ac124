//! `x-request-id`: keep the client's, otherwise make one. Every log line of a
//! request carries it, and the upstream sees it.
//!
//! ```
//! use http::HeaderMap;
//! use idemproxy::request_id::{ensure_request_id, X_REQUEST_ID};
//! let mut headers = HeaderMap::new();
//! let id = ensure_request_id(&mut headers);
//! assert_eq!(headers[&X_REQUEST_ID], id);
//! ```

use http::{HeaderMap, HeaderName, HeaderValue};

/// The header name.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Returns the request's id, inserting a fresh UUID when the client sent none
/// (or an empty one).
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID).filter(|v| !v.is_empty()) {
        return v.clone();
    }
    let mut buf = uuid::Uuid::encode_buffer();
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    let value = HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("-"));
    headers.insert(X_REQUEST_ID.clone(), value.clone());
    value
}
