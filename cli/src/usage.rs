//! [`UsageError`]: a bad command line or bad input file named by a flag (exit code 2), shared
//! by the training flags, the recipe flags and every subcommand.

/// A bad command line. `Display` is a single line without the `dtrain: error:` prefix.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// `--help` / `--version`: not an error for the user; print the text and exit 0.
    #[error("{0}")]
    Help(String),
    /// Rejected by clap (unknown flag, bad enum value, unparsable number...).
    #[error("{0}")]
    Clap(String),
    /// A value that parses but makes no sense (rank >= world size, lr NaN, ...).
    #[error("{0}")]
    Invalid(String),
}

impl UsageError {
    pub fn is_help(&self) -> bool {
        matches!(self, UsageError::Help(_))
    }

    /// Turn a clap error into one line: its first line without clap's "error: " prefix.
    pub fn from_clap(err: clap::Error) -> Self {
        use clap::error::ErrorKind;
        match err.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                UsageError::Help(err.render().to_string())
            }
            _ => {
                let text = err.render().to_string();
                let first = text
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("invalid command line");
                let first = first.strip_prefix("error: ").unwrap_or(first).trim();
                UsageError::Clap(format!("{first} (see dtrain --help)"))
            }
        }
    }
}
