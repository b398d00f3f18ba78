//! The one line an error becomes on stderr.

/// The error and its causes, outermost first, joined by `: `, each said once. A cause whose
/// text the line already holds is left out: library errors often repeat their source in their
/// own message (`reading /x: No such file…`, then the I/O error itself), and reqwest's errors
/// are chained the same way, so `{:#}` would print those texts twice.
pub fn message(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    /// Like a `thiserror` variant with a `source` field: the source is both in the message and
    /// the next link of the chain.
    #[derive(Debug)]
    struct Reading {
        path: &'static str,
        source: std::io::Error,
    }

    impl std::fmt::Display for Reading {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "reading {}: {}", self.path, self.source)
        }
    }

    impl std::error::Error for Reading {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    fn reading() -> Reading {
        Reading {
            path: "/nonexistent",
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory"),
        }
    }

    #[test]
    fn a_source_already_in_the_message_is_said_once() {
        let e = anyhow::Error::new(reading());
        assert_eq!(
            format!("{e:#}").matches("No such file").count(),
            2,
            "the defect this avoids"
        );
        assert_eq!(message(&e), "reading /nonexistent: No such file or directory");
    }

    #[test]
    fn contexts_and_new_causes_are_kept_in_order() {
        let e = Err::<(), _>(reading()).context("loading the trace").unwrap_err();
        assert_eq!(
            message(&e),
            "loading the trace: reading /nonexistent: No such file or directory"
        );
        let e = Err::<(), _>(std::io::Error::other("connection refused"))
            .context("cannot reach http://127.0.0.1:1")
            .unwrap_err();
        assert_eq!(message(&e), "cannot reach http://127.0.0.1:1: connection refused");
    }
}
