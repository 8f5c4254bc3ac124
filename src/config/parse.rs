//! The small parsers behind the options, and the redaction of secrets in
//! what an error or `--check-config` shows. Each says what it expects.

use std::net::SocketAddr;
use std::path::PathBuf;

use http::Uri;
use http::uri::Scheme;
use http::{HeaderName, Method, StatusCode};

use super::Upstream;
use crate::routes::Template;

/// Reads `on|off`, `true|false`, `yes|no`, `1|0`.
pub fn parse_bool(text: &str) -> Result<bool, &'static str> {
    match text.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err("on or off (also true/false, yes/no, 1/0)"),
    }
}

pub(super) fn parse_upstream(text: &str) -> Result<Upstream, &'static str> {
    const EXPECTED: &str =
        "an absolute URL with scheme http or https and no path, e.g. http://127.0.0.1:8080";
    let uri: Uri = text.trim().parse().map_err(|_| EXPECTED)?;
    let scheme = uri.scheme().cloned().ok_or(EXPECTED)?;
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(EXPECTED);
    }
    let authority = uri.authority().cloned().ok_or(EXPECTED)?;
    if authority.host().is_empty() || authority.as_str().contains('@') {
        return Err(EXPECTED);
    }
    if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
        return Err(EXPECTED);
    }
    Ok(Upstream { scheme, authority })
}

pub(super) fn parse_addr(text: &str) -> Result<SocketAddr, &'static str> {
    text.trim()
        .parse()
        .map_err(|_| "a socket address such as 127.0.0.1:7480 or [::1]:7480")
}

/// A loopback socket address: only processes of the pod reach it.
/// `instead` names the option that allows the same on the other listener.
pub(super) fn parse_loopback_addr(text: &str, instead: &str) -> Result<SocketAddr, String> {
    let addr = parse_addr(text).map_err(str::to_owned)?;
    if addr.ip().to_canonical().is_loopback() {
        Ok(addr)
    } else {
        Err(format!(
            "a loopback address such as 127.0.0.1:7482 or [::1]:7482, because this listener serves the admin endpoints that change state and {} is reachable from outside the pod; to allow changes on the admin listener instead, set {}",
            addr.ip(),
            instead
        ))
    }
}

/// Whether listeners on `a` and `b` would compete for one port.
pub(super) fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

pub(super) fn existing_file(text: &str) -> Result<PathBuf, &'static str> {
    let path = PathBuf::from(text);
    if path.is_file() {
        Ok(path)
    } else {
        Err("the path of a readable file")
    }
}

/// A PEM file holding at least one certificate (checked here so that a bad
/// file is a configuration error naming its variable, not a start-up failure).
pub(super) fn pem_certificates(text: &str) -> Result<PathBuf, &'static str> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let path = existing_file(text)?;
    match CertificateDer::pem_file_iter(&path).map(|certs| certs.collect::<Result<Vec<_>, _>>()) {
        Ok(Ok(certs)) if !certs.is_empty() => Ok(path),
        _ => Err("the path of a PEM file holding at least one certificate"),
    }
}

/// A PEM file holding a private key.
pub(super) fn pem_private_key(text: &str) -> Result<PathBuf, &'static str> {
    use rustls_pki_types::{PrivateKeyDer, pem::PemObject};
    let path = existing_file(text)?;
    PrivateKeyDer::from_pem_file(&path)
        .map(|_| path)
        .map_err(|_| "the path of a PEM file holding a private key")
}

pub(super) fn parse_statuses(text: &str) -> Result<Vec<StatusCode>, &'static str> {
    const EXPECTED: &str =
        "a comma-separated list of HTTP status codes (100-599), e.g. 500,502,503";
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u16>()
                .ok()
                .filter(|n| (100..=599).contains(n))
                .and_then(|n| StatusCode::from_u16(n).ok())
                .ok_or(EXPECTED)
        })
        .collect()
}

pub(super) fn parse_methods(text: &str) -> Result<Vec<Method>, &'static str> {
    const EXPECTED: &str = "a comma-separated list of HTTP methods, e.g. POST,PATCH";
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| Method::from_bytes(t.to_ascii_uppercase().as_bytes()).map_err(|_| EXPECTED))
        .collect()
}

pub(super) fn parse_header_names(text: &str) -> Result<Vec<HeaderName>, &'static str> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            HeaderName::from_bytes(t.as_bytes())
                .map_err(|_| "a comma-separated list of header names")
        })
        .collect()
}

/// What `--check-config` and error messages show instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// A header-template option (`name: value` pairs separated by `;` or
/// newlines) with every value replaced by [`REDACTED`]: header values may be
/// credentials (`authorization: Bearer ...`). A part without `:` has no
/// value and is kept, so that an error still shows what is wrong.
pub(super) fn redact_header_values(text: &str) -> String {
    text.split([';', '\n'])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|pair| match pair.split_once(':') {
            Some((name, _)) => format!("{}: {REDACTED}", name.trim()),
            None => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A URL with its user information (`user:password@`) replaced by [`REDACTED`].
pub(super) fn redact_userinfo(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    match url[start..authority_end].rfind('@') {
        Some(at) => format!("{}{REDACTED}{}", &url[..start], &url[start + at..]),
        None => url.to_owned(),
    }
}

pub(super) fn parse_set_headers(text: &str) -> Result<Vec<(HeaderName, Template)>, String> {
    const EXPECTED: &str = "`name: template` pairs separated by `;` or newlines, e.g. x-ms-lease-action: renew; x-ms-lease-id: {session}";
    text.split([';', '\n'])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once(':').ok_or_else(|| EXPECTED.to_owned())?;
            let name =
                HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| EXPECTED.to_owned())?;
            let template =
                Template::parse_header(value.trim()).map_err(|e| format!("{EXPECTED} ({e})"))?;
            if let Some(p) = template.stored_placeholder() {
                return Err(format!(
                    "{EXPECTED} ({p} is only for a route's recovered-body=)"
                ));
            }
            Ok((name, template))
        })
        .collect()
}
