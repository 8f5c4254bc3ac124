//! Validation: the [`Checker`] parses each option of [`Args`] by its
//! declaration and collects every problem, so that all bad values are
//! reported at once ([`ConfigError`], one line each).

use std::fmt;

use super::Args;
use super::options::{self, Kind, Opt};

/// One rejected option, or a variable that names no option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigIssue {
    /// A bad value: which variable, what value, what was expected.
    Invalid {
        /// The environment variable, e.g. `IDEMPROXY_CONNECT_TIMEOUT`.
        variable: &'static str,
        /// The value given (redacted for secrets).
        value: String,
        /// What is expected instead.
        expected: String,
    },
    /// An `IDEMPROXY_*` variable of the environment that is no option: a
    /// typo would otherwise change nothing, silently. Its value is never
    /// shown (it may be a secret).
    Unknown {
        /// The variable, e.g. `IDEMPROXY_HEARTBEAT_INTERVALL`.
        variable: String,
        /// The option's variable it is probably a typo of.
        closest: Option<&'static str>,
    },
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigIssue::Invalid {
                variable,
                value,
                expected,
            } => {
                let flag = variable
                    .trim_start_matches(options::PREFIX)
                    .to_ascii_lowercase()
                    .replace('_', "-");
                // Some parsers already phrase their message as "expected ..." or name the bad word.
                let lead = if expected.contains("expected") {
                    ""
                } else {
                    "expected "
                };
                write!(
                    f,
                    "invalid {variable} (--{flag}) {value:?}: {lead}{expected}"
                )
            }
            ConfigIssue::Unknown {
                variable,
                closest: Some(closest),
            } => write!(f, "unknown variable {variable}; did you mean {closest}?"),
            ConfigIssue::Unknown {
                variable,
                closest: None,
            } => write!(
                f,
                "unknown variable {variable}: no option has this name (idemproxy --env-reference lists them)"
            ),
        }
    }
}

/// Every bad option found while validating; one line each when displayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError(pub Vec<ConfigIssue>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "idemproxy: {issue}")?;
        }
        Ok(())
    }
}

/// Reads the options of one [`Args`] by their declarations, collecting
/// every issue.
pub(crate) struct Checker<'a> {
    args: &'a Args,
    issues: Vec<ConfigIssue>,
}

impl<'a> Checker<'a> {
    /// Starts with the unknown variables of `args`, each with the option
    /// it is probably a typo of.
    pub(crate) fn new(args: &'a Args) -> Checker<'a> {
        let issues = args
            .unknown_variables
            .iter()
            .map(|variable| ConfigIssue::Unknown {
                closest: closest_variable(variable),
                variable: variable.clone(),
            })
            .collect();
        Checker { args, issues }
    }

    /// Records issues found before the options are read.
    pub(crate) fn extend(&mut self, issues: Vec<ConfigIssue>) {
        self.issues.extend(issues);
    }

    /// Whether `opt` was given, rather than left at its default.
    pub(crate) fn given<K: Kind + Sync>(&self, opt: &Opt<K>) -> bool {
        self.args.is_given(opt)
    }

    /// The text of `opt` (given, or its default); `None` when unset.
    pub(crate) fn text<K: Kind + Sync>(&self, opt: &Opt<K>) -> Option<&'a str> {
        self.args.get(opt)
    }

    /// Records that `value` of `opt` is bad, shown as the option's
    /// redaction allows.
    pub(crate) fn issue<K>(&mut self, opt: &Opt<K>, value: &str, expected: impl Into<String>) {
        self.issues.push(ConfigIssue::Invalid {
            variable: opt.name,
            value: opt.redact.apply(value),
            expected: expected.into(),
        });
    }

    /// The value of `opt`, parsed by its kind; a bad one is recorded and
    /// replaced by the kind's fallback.
    pub(crate) fn get<K: Kind + Sync>(&mut self, opt: &Opt<K>) -> K::Value {
        self.parse(opt, opt.kind.fallback(), |v| opt.kind.parse(v))
    }

    /// Parses the text of `opt` (empty when unset) with `parse`, recording
    /// an issue (and returning `fallback`) on failure.
    pub(crate) fn parse<K: Kind + Sync, T, E: fmt::Display>(
        &mut self,
        opt: &Opt<K>,
        fallback: T,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> T {
        let text = self.text(opt).unwrap_or_default();
        match parse(text) {
            Ok(v) => v,
            Err(e) => {
                self.issue(opt, text, e.to_string());
                fallback
            }
        }
    }

    /// Like [`parse`](Self::parse), for an option that may be unset:
    /// `None` when it is, or when its text is bad (recorded).
    pub(crate) fn parse_given<K: Kind + Sync, T, E: fmt::Display>(
        &mut self,
        opt: &Opt<K>,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        self.text(opt)?;
        self.parse(opt, None, |v| parse(v).map(Some))
    }

    /// Every issue, or `Ok` when there is none.
    pub(crate) fn finish(self) -> Result<(), ConfigError> {
        if self.issues.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(self.issues))
        }
    }
}

/// The option's variable that `name` is most likely a typo of: the nearest
/// by edit distance (ignoring case), if at most a quarter of its letters
/// (at least two) differ.
pub(crate) fn closest_variable(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_uppercase();
    options::ALL
        .iter()
        .map(|o| (edit_distance(&name, o.name()), o.name()))
        .filter(|(d, k)| {
            *d <= k
                .len()
                .saturating_sub(options::PREFIX.len())
                .div_ceil(4)
                .max(2)
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance: insertions, deletions and substitutions of bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}
