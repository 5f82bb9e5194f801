//! What can go wrong in a command, and the exit code each failure maps to.

use std::error::Error as StdError;
use std::fmt;

/// A failed command; `main` prints it as `error: <display>` and exits with [`CliError::exit_code`].
#[derive(Debug)]
pub enum CliError {
    /// The server answered with an error body (exit 1).
    Api {
        /// HTTP status code.
        status: u16,
        /// The contract's snake_case error code.
        code: String,
        /// The server's human sentence.
        message: String,
    },
    /// The command line was wrong in a way clap could not see, e.g. invalid JSON (exit 2).
    Usage(String),
    /// The server could not be reached or did not answer in time (exit 3).
    Unreachable(String),
    /// Anything else, e.g. a response that breaks the contract (exit 1).
    Failed(String),
}

impl CliError {
    /// The process exit code for this failure: 1 server error, 2 usage, 3 unreachable.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Api { .. } | CliError::Failed(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Unreachable(_) => 3,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Api {
                status,
                code,
                message,
            } => write!(f, "{code}: {message} (HTTP {status})"),
            CliError::Usage(message) | CliError::Failed(message) => f.write_str(message),
            CliError::Unreachable(message) => write!(f, "cannot reach the server: {message}"),
        }
    }
}

/// Joins an error with its chain of causes, because reqwest and hyper hide the useful part
/// (e.g. "Connection refused") in `source()`.
pub fn describe(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_render_code_message_and_status() {
        let err = CliError::Api {
            status: 404,
            code: "key_not_found".into(),
            message: "no such key".into(),
        };
        assert_eq!(err.to_string(), "key_not_found: no such key (HTTP 404)");
        assert_eq!(err.exit_code(), 1);
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        assert_eq!(CliError::Unreachable("x".into()).exit_code(), 3);
    }

    #[test]
    fn describe_includes_causes() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = std::io::Error::other(inner);
        assert!(describe(&outer).contains("refused"));
    }
}
