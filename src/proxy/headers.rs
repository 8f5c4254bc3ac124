//! Header rewriting between client and upstream (RFC 9110 section 7.6):
//! hop-by-hop headers are removed in both directions, `Host` is set to the
//! upstream, `X-Forwarded-*` say where the request came from.

use std::io::Write as _;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, never forwarded (besides those named by `Connection`).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// `x-forwarded-for`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-forwarded-host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether the headers ask for a protocol upgrade (`Connection: upgrade` plus `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers. When `keep_upgrade` is set (a tunnelled
/// upgrade), `Connection: upgrade` and `Upgrade` survive.
///
/// This runs twice per request (request and response head), so the usual
/// cases cost little: a head without `Connection` and without any other
/// hop-by-hop header is only scanned once, and `Connection: keep-alive` is
/// handled without allocating.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Headers named by Connection are hop-by-hop too; Connection itself goes with them.
    remove_connection_named(headers, keep_upgrade);
    // One pass over the names: usually nothing else is there to remove.
    let any_left = headers
        .keys()
        .any(|name| is_hop_by_hop(name) || (!keep_upgrade && name == header::UPGRADE));
    if any_left {
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
        // Any other Proxy-* header is meant for a proxy, i.e. for us.
        let proxy_named: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for name in proxy_named {
            headers.remove(name);
        }
        if !keep_upgrade {
            headers.remove(header::UPGRADE);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether `name` is hop-by-hop by itself (the fixed list or `Proxy-*`).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name.as_str().starts_with("proxy-")
}

/// Removes every `Connection` line and the headers its tokens name (but not
/// `Upgrade` when `keep_upgrade`).
fn remove_connection_named(headers: &mut HeaderMap, keep_upgrade: bool) {
    match headers.get_all(header::CONNECTION).iter().count() {
        0 => {}
        // The usual case: one line, taken out without collecting anything.
        1 => {
            if let Some(value) = headers.remove(header::CONNECTION) {
                remove_named(headers, &value, keep_upgrade);
            }
        }
        _ => {
            let values: Vec<HeaderValue> = headers
                .get_all(header::CONNECTION)
                .iter()
                .cloned()
                .collect();
            headers.remove(header::CONNECTION);
            for value in &values {
                remove_named(headers, value, keep_upgrade);
            }
        }
    }
}

/// Removes the headers named by the tokens of one `Connection` value.
fn remove_named(headers: &mut HeaderMap, connection: &HeaderValue, keep_upgrade: bool) {
    let Ok(text) = connection.to_str() else {
        return;
    };
    for token in text.split(',').map(str::trim) {
        if token.is_empty() || (keep_upgrade && token.eq_ignore_ascii_case("upgrade")) {
            continue;
        }
        // A `&str` key is matched case-insensitively without allocating; a
        // token that is no valid header name matches nothing.
        headers.remove(token);
    }
}

/// Appends the client address to `X-Forwarded-For` and sets `-Proto` and `-Host`.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    original_host: Option<HeaderValue>,
) {
    // Several X-Forwarded-For lines form one list (RFC 9110 section 5.3): keep them all.
    let prev: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if prev.is_empty() {
        headers.insert(X_FORWARDED_FOR.clone(), client.clone());
    } else {
        let ip = client.to_str().unwrap_or("");
        if let Ok(v) = HeaderValue::try_from(format!("{}, {ip}", prev.join(", "))) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    if let Some(host) = original_host {
        if !headers.contains_key(&X_FORWARDED_HOST) {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
    }
}

/// `ip` as a header value, for `X-Forwarded-For`: made once per connection.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    let mut buf = [0_u8; IP_TEXT_MAX];
    HeaderValue::from_str(ip_text(ip, &mut buf)).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The longest text of an IP address (`ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`).
const IP_TEXT_MAX: usize = 45;

/// Writes `ip` as text into `buf` and returns it. IPv4, the usual case, is
/// written digit by digit: `Display` costs more than the rest of the header
/// rewrite together.
fn ip_text(ip: IpAddr, buf: &mut [u8; IP_TEXT_MAX]) -> &str {
    let len = match ip {
        IpAddr::V4(v4) => {
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    buf[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    buf[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                buf[len] = b'0' + octet % 10;
                len += 1;
            }
            len
        }
        IpAddr::V6(v6) => {
            let mut rest = &mut buf[..];
            // Cannot fail: the buffer holds the longest IPv6 text.
            let _ = write!(rest, "{v6}");
            IP_TEXT_MAX - rest.len()
        }
    };
    // Only ASCII digits, dots, colons and hex letters were written.
    std::str::from_utf8(&buf[..len]).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("proxy-foo", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-end-to-end"]);
    }

    #[test]
    fn upgrade_survives_when_tunnelling() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        add_forwarded(
            &mut h,
            &ip_value("127.0.0.1".parse().unwrap()),
            Some(HeaderValue::from_static("api.local")),
        );
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "api.local");
    }

    #[test]
    fn ip_text_matches_display() {
        let mut buf = [0_u8; IP_TEXT_MAX];
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.3.255",
            "192.168.100.9",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.128",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip, &mut buf), ip.to_string());
        }
    }

    #[test]
    fn connection_tokens_are_matched_case_insensitively_and_all_lines_count() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("X-Hop-One"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("x-hop-two, , close"),
        );
        h.insert("x-hop-one", HeaderValue::from_static("1"));
        h.insert("x-hop-two", HeaderValue::from_static("2"));
        h.insert("x-kept", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn a_head_without_hop_by_hop_headers_is_unchanged() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
    }
}
