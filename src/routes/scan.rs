//! The one placeholder scanner behind every template and path template,
//! and the rules for the literal text of a URL template.

/// Why a template did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{` without its `}`, a `}` without its `{`, or a `{` inside a placeholder.
    #[error("unbalanced braces at byte {at}")]
    Unbalanced {
        /// Byte offset of the offending brace.
        at: usize,
    },
    /// A placeholder that is none of the known kinds.
    #[error(
        "unknown placeholder {{{placeholder}}}: expected {{name}}, {{*name}}, {{body.a.b}}, \
         {{header.X-Name}}, {{query.q}}, {{query}} or {{session}}"
    )]
    UnknownPlaceholder {
        /// The text between the braces.
        placeholder: String,
    },
    /// A placeholder of a known kind whose argument is invalid.
    #[error("invalid placeholder {{{placeholder}}}: {reason}")]
    InvalidPlaceholder {
        /// The text between the braces.
        placeholder: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A URL template that does not start with `/`.
    #[error("a path template must start with /")]
    NotAPath,
    /// A URL template whose literal text would make an absolute or scheme-relative URL.
    #[error("a path template must not start with // or /\\ (that would name another host)")]
    AbsoluteUrl,
    /// A character that may not appear literally in this kind of template.
    #[error("the character {ch:?} is not allowed here{hint}")]
    InvalidCharacter {
        /// The character.
        ch: char,
        /// An extra hint (may be empty).
        hint: &'static str,
    },
    /// `{query}` outside the query part of a URL template.
    #[error("{{query}} may only follow a literal ? in a path template")]
    QueryOutsideQueryPart,
    /// A placeholder kind this template cannot hold.
    #[error("{{{placeholder}}} is not allowed {context}")]
    NotAllowed {
        /// The text between the braces.
        placeholder: String,
        /// Where it is not allowed.
        context: &'static str,
    },
    /// A path template to match that names a capture twice.
    #[error("the capture {{{name}}} appears twice")]
    DuplicateCapture {
        /// The capture name.
        name: String,
    },
    /// Two captures side by side in one segment (`{a}{b}`): ambiguous.
    #[error(
        "two captures side by side in one segment are ambiguous; put literal text between them"
    )]
    AdjacentCaptures,
    /// `{*name}` that is not the whole last segment of a path template to match.
    #[error("{{*{name}}} must be the whole last segment of the path template")]
    RestNotLast {
        /// The capture name.
        name: String,
    },
    /// A method word that is not a known HTTP method.
    #[error("{method:?} is not an HTTP method")]
    BadMethod {
        /// The word.
        method: String,
    },
}

/// What a placeholder-free piece of text or a placeholder is, as scanned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Token<'a> {
    Literal(&'a str),
    /// The text between the braces.
    Placeholder(&'a str),
}

/// How braces that do not form a placeholder are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Braces {
    /// Every brace must belong to a placeholder.
    Strict,
    /// A `{` that does not open a well-formed placeholder is literal text (JSON).
    Lenient,
}

/// The one placeholder scanner behind every template and path template.
pub(crate) fn scan(text: &str, braces: Braces) -> Result<Vec<Token<'_>>, TemplateError> {
    let mut tokens = Vec::new();
    let mut literal_start = 0;
    let mut pos = 0;
    while let Some(offset) = text.get(pos..).and_then(|rest| rest.find(['{', '}'])) {
        let at = pos + offset;
        let opening = text.as_bytes().get(at) == Some(&b'{');
        if !opening {
            if braces == Braces::Strict {
                return Err(TemplateError::Unbalanced { at });
            }
            pos = at + 1;
            continue;
        }
        let after = at + 1;
        let close = text
            .get(after..)
            .and_then(|rest| rest.find(['{', '}']))
            .map(|i| after + i)
            .filter(|&i| text.as_bytes().get(i) == Some(&b'}'));
        let content = close.and_then(|close| text.get(after..close));
        match (content, close) {
            (Some(content), Some(close))
                if braces == Braces::Strict || looks_like_placeholder(content) =>
            {
                if let Some(literal) = text.get(literal_start..at).filter(|l| !l.is_empty()) {
                    tokens.push(Token::Literal(literal));
                }
                tokens.push(Token::Placeholder(content));
                pos = close + 1;
                literal_start = pos;
            }
            _ if braces == Braces::Strict => return Err(TemplateError::Unbalanced { at }),
            _ => pos = after,
        }
    }
    if let Some(literal) = text.get(literal_start..).filter(|l| !l.is_empty()) {
        tokens.push(Token::Literal(literal));
    }
    Ok(tokens)
}

/// In a JSON template, only `{` + these characters + `}` is a placeholder.
fn looks_like_placeholder(content: &str) -> bool {
    !content.is_empty()
        && content
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.*[]$@~".contains(&b))
}

/// Whether `name` is a valid capture name: ASCII letters, digits, `_` and `-`.
pub(crate) fn is_capture_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Characters that may appear literally in a URL template (RFC 3986
/// unreserved, sub-delims, `:`, `@`, `/`, `?` and `%` escapes).
pub(crate) fn is_url_literal_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// Checks the literal text of a URL template: allowed characters only, and
/// every `%` followed by two hex digits.
pub(crate) fn check_url_literal(literal: &str) -> Result<(), TemplateError> {
    let bytes = literal.as_bytes();
    for (i, c) in literal.char_indices() {
        let allowed = c.is_ascii() && is_url_literal_byte(c as u8);
        if !allowed {
            let hint = if c == '#' {
                " (a fragment is never sent)"
            } else {
                "; percent-encode it"
            };
            return Err(TemplateError::InvalidCharacter { ch: c, hint });
        }
        if c == '%' {
            let escape = bytes.get(i + 1..i + 3);
            if !escape.is_some_and(|e| e.iter().all(u8::is_ascii_hexdigit)) {
                return Err(TemplateError::InvalidCharacter {
                    ch: '%',
                    hint: " unless followed by two hex digits",
                });
            }
        }
    }
    Ok(())
}
