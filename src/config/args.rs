//! [`Args`]: every option as text, from the command line and a source of
//! variables ([`Strings`]), before validation. The clap command is built
//! from the declarations of [`options`].

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

use super::options::{self, Describe};
use super::source::{ProcessEnv, Strings};

/// The flags without a variable.
const CHECK_CONFIG: &str = "check-config";
const ENV_REFERENCE: &str = "env-reference";

/// Every option as text: as given (the command line first, then its
/// variable) or its default. [`Config::from_args`](super::Config::from_args)
/// validates it.
#[derive(Debug, Clone, Default)]
pub struct Args {
    /// By variable.
    values: BTreeMap<&'static str, String>,
    /// The variables given (by flag or variable), not left at their default.
    given: BTreeSet<&'static str>,
    /// `--check-config`: print the effective configuration (secrets redacted) and exit.
    pub check_config: bool,
    /// `--env-reference`: print the Markdown reference of every variable and flag and exit.
    pub env_reference: bool,
    /// The `IDEMPROXY_*` variables of the source that name no option
    /// (reported by [`Config::from_args`](super::Config::from_args)).
    pub unknown_variables: Vec<String>,
}

impl Args {
    /// Whether `option` was given (by flag or variable), rather than left
    /// at its default.
    pub fn is_given(&self, option: &dyn Describe) -> bool {
        self.given.contains(option.name())
    }

    /// Sets `option` as if it had been given (a profile's expansion).
    pub(super) fn set(&mut self, option: &dyn Describe, value: String) {
        self.values.insert(option.name(), value);
        self.given.insert(option.name());
    }

    /// The text of `option` (given, or its default); `None` when unset.
    pub fn get(&self, option: &dyn Describe) -> Option<&str> {
        self.values.get(option.name()).map(String::as_str)
    }

    /// The command line as `--help` shows it: every option of
    /// [`options::ALL`] on its flag and variable (`[env: ...]` shows the
    /// process environment's values), then the flags without a variable.
    pub fn command() -> Command {
        command(true)
    }

    /// The command line and the process environment, as the binary reads
    /// them. A command line that clap does not accept (or `--help`,
    /// `--version`) prints clap's message and exits.
    pub fn from_env() -> Args {
        Self::try_parse_from_strings(std::env::args_os(), &ProcessEnv).unwrap_or_else(|e| e.exit())
    }

    /// Parses `argv` (the program's name first) and, for every option that
    /// the command line does not set, its variable from `env`; the process
    /// environment is never read (except to show values in `--help`).
    pub fn try_parse_from_strings<I, T>(
        argv: I,
        env: &(impl Strings + ?Sized),
    ) -> Result<Args, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let mut argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        let mut command = command(false);
        let given = match command.try_get_matches_from_mut(&argv) {
            Ok(matches) => matches,
            // `--help` shows the variables: render it (or the error) with them.
            Err(e) => {
                return Err(Args::command()
                    .try_get_matches_from(&argv)
                    .err()
                    .unwrap_or(e));
            }
        };
        // A variable applies when the command line does not set its option,
        // as with clap's `env`: it is passed on as that option.
        for option in options::ALL {
            if given.value_source(option.name()) == Some(ValueSource::CommandLine) {
                continue;
            }
            if let Some(value) = env.get(option.name()) {
                let mut arg = OsString::from(format!("--{}=", option.flag()));
                arg.push(value);
                argv.push(arg);
            }
        }
        let matches = command.try_get_matches_from_mut(argv)?;
        let mut unknown_variables: Vec<String> = env
            .names_with_prefix(options::PREFIX)
            .into_iter()
            .filter(|name| options::ALL.iter().all(|o| o.name() != name))
            .collect();
        unknown_variables.sort();
        Ok(Args {
            values: options::ALL
                .iter()
                .filter_map(|o| Some((o.name(), text(&matches, o.name())?.clone())))
                .collect(),
            given: options::ALL
                .iter()
                .filter(|o| matches.value_source(o.name()) == Some(ValueSource::CommandLine))
                .map(|o| o.name())
                .collect(),
            check_config: flag(&matches, CHECK_CONFIG),
            env_reference: flag(&matches, ENV_REFERENCE),
            unknown_variables,
        })
    }
}

fn text<'m>(matches: &'m ArgMatches, id: &str) -> Option<&'m String> {
    matches.try_get_one::<String>(id).ok().flatten()
}

fn flag(matches: &ArgMatches, id: &str) -> bool {
    matches
        .try_get_one::<bool>(id)
        .ok()
        .flatten()
        .is_some_and(|set| *set)
}

/// The clap command of every option; `with_env`: each also names its
/// variable, which clap reads from the process environment when the
/// command is built.
fn command(with_env: bool) -> Command {
    let mut command = Command::new("idemproxy")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Sidecar reverse proxy: idempotent writes, safe retries, verified 409 recovery and session heartbeats for an unchanged client.")
        .long_about(None)
        .max_term_width(100);
    for option in options::ALL {
        let mut arg = Arg::new(option.name())
            .long(option.flag())
            .value_name(option.value_name())
            .help(option.help())
            .action(ArgAction::Set)
            .value_parser(clap::value_parser!(String));
        if with_env {
            arg = arg.env(option.name());
        }
        if let Some(default) = option.default() {
            arg = arg.default_value(default);
        }
        command = command.arg(arg);
    }
    command
        .arg(
            Arg::new(CHECK_CONFIG)
                .long(CHECK_CONFIG)
                .action(ArgAction::SetTrue)
                .help("Print the effective configuration (secrets redacted) and exit"),
        )
        .arg(
            Arg::new(ENV_REFERENCE)
                .long(ENV_REFERENCE)
                .action(ArgAction::SetTrue)
                .help("Print the Markdown reference of every variable and flag (the READMEs' table) and exit"),
        )
}
