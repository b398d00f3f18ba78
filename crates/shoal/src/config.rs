//! The CLI's config file: `$SHOAL_CONFIG`, else `~/.config/shoal/config.toml`. It holds
//! `key = "value"` lines (TOML's plain key/string pairs) for `url` and `token`, and `#` comments.
//! Anything else is refused with the file and line: a misspelt key silently ignored would send
//! the CLI to the default controller.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The keys the file may set.
const KEYS: [&str; 2] = ["url", "token"];

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The controller's URL, checked to be one.
    pub url: Option<String>,
    pub token: Option<String>,
}

/// Reads the config file; none is an empty config.
pub fn load() -> anyhow::Result<Config> {
    let path = match std::env::var_os("SHOAL_CONFIG") {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".config/shoal/config.toml"),
            None => return Ok(Config::default()),
        },
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(e).with_context(|| format!("reading the config file {}", path.display())),
    }
}

/// Parses the text of the config file at `path` (named in every error).
pub fn parse(path: &Path, text: &str) -> anyhow::Result<Config> {
    let mut config = Config::default();
    for (i, line) in text.lines().enumerate() {
        let at = || format!("config file {} line {}", path.display(), i + 1);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("{}: expected key = \"value\", found {line:?}", at());
        };
        let key = key.trim();
        let slot = match key {
            "url" => &mut config.url,
            "token" => &mut config.token,
            _ => bail!("{}: unknown key {key:?} (the keys are {})", at(), KEYS.join(" and ")),
        };
        let Some(value) = string(value) else {
            bail!(
                "{}: the value of {key} must be a string in double quotes, e.g. {key} = \"{}\"",
                at(),
                if key == "url" { "http://127.0.0.1:7700" } else { "…" }
            );
        };
        if slot.is_some() {
            bail!("{}: {key} is set twice", at());
        }
        if key == "url" {
            shoal_client::check_base_url(&value).with_context(|| format!("{}: the value of url", at()))?;
        }
        *slot = Some(value);
    }
    Ok(config)
}

/// A TOML string without escapes, `"…"` or `'…'`, optionally followed by a comment.
fn string(value: &str) -> Option<String> {
    let value = value.trim();
    let quote = value.chars().next().filter(|c| *c == '"' || *c == '\'')?;
    let rest = &value[1..];
    let end = rest.find(quote)?;
    let after = rest[end + 1..].trim();
    let inner = &rest[..end];
    if !(after.is_empty() || after.starts_with('#')) || (quote == '"' && inner.contains('\\')) {
        return None;
    }
    Some(inner.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> anyhow::Result<Config> {
        parse(Path::new("/home/a/.config/shoal/config.toml"), text)
    }

    fn error(text: &str) -> String {
        crate::error::message(&parse_text(text).unwrap_err())
    }

    #[test]
    fn reads_url_and_token_with_comments() {
        let c = parse_text("# where the controller is\nurl = \"http://10.0.0.1:7700\"  # the lab\n\ntoken = 'abc'\n")
            .unwrap();
        assert_eq!(c.url.as_deref(), Some("http://10.0.0.1:7700"));
        assert_eq!(c.token.as_deref(), Some("abc"));
    }

    #[test]
    fn an_unknown_key_is_refused_naming_it_and_the_file() {
        let e = error("url = \"http://10.0.0.1:7700\"\nurll = \"http://x\"\n");
        assert_eq!(
            e,
            "config file /home/a/.config/shoal/config.toml line 2: unknown key \"urll\" (the keys are url and token)"
        );
    }

    #[test]
    fn a_url_that_is_no_string_or_no_url_is_refused_naming_the_file() {
        let e = error("url = 5\n");
        assert!(
            e.starts_with("config file /home/a/.config/shoal/config.toml line 1: the value of url must be a string"),
            "{e}"
        );
        let e = error("url = \"ftp://x\"\n");
        assert!(
            e.starts_with("config file /home/a/.config/shoal/config.toml line 1: the value of url: \"ftp://x\" is not a valid URL"),
            "{e}"
        );
        for bad in [
            "token = abc",
            "token = \"a\" trailing",
            "url",
            "token = \"a\"\ntoken = \"b\"",
        ] {
            assert!(parse_text(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
