//! Percent-encoding of substituted values and percent-decoding of captures.

use std::borrow::Cow;

pub(super) const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Percent-encodes every byte except ALPHA, DIGIT, `-`, `.`, `_` and `~`.
pub(crate) fn push_encoded(out: &mut String, value: &str) {
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes `text` (and `+` as a space when `plus_as_space`). A `%`
/// not followed by two hex digits stays as it is. `None` when the decoded
/// bytes are not UTF-8. Borrows when there is nothing to decode.
pub(crate) fn percent_decode(text: &str, plus_as_space: bool) -> Option<Cow<'_, str>> {
    if !text
        .bytes()
        .any(|b| b == b'%' || (plus_as_space && b == b'+'))
    {
        return Some(Cow::Borrowed(text));
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let escaped = (b == b'%')
            .then(|| {
                let high = bytes.get(i + 1).copied().and_then(hex_value)?;
                let low = bytes.get(i + 2).copied().and_then(hex_value)?;
                Some(high << 4 | low)
            })
            .flatten();
        match escaped {
            Some(decoded) => {
                out.push(decoded);
                i += 3;
            }
            None => {
                out.push(if plus_as_space && b == b'+' { b' ' } else { b });
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}
