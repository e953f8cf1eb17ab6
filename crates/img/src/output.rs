//! Output helpers: an ordered JSON value printed the way qemu-img prints it, human sizes,
//! and the progress bar.

use std::fmt::Write;

/// A JSON value whose objects keep their key order.
#[derive(Debug, Clone)]
pub enum Json {
    /// Integer.
    Int(i128),
    /// Boolean.
    Bool(bool),
    /// String.
    Str(String),
    /// Array.
    Arr(Vec<Json>),
    /// Object with ordered keys.
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Builds an object from pairs.
    pub fn obj(pairs: Vec<(&str, Json)>) -> Json {
        Json::Obj(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    /// Unsigned integer.
    pub fn u(v: u64) -> Json {
        Json::Int(i128::from(v))
    }

    /// String.
    pub fn s(v: &str) -> Json {
        Json::Str(v.to_owned())
    }

    /// Pretty-prints with qemu's 4-space indentation.
    pub fn pretty(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    fn write(&self, out: &mut String, indent: usize) {
        match self {
            Json::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Str(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
            Json::Arr(items) => {
                if items.is_empty() {
                    out.push_str("[\n");
                    out.push_str(&" ".repeat(indent * 4));
                    out.push(']');
                    return;
                }
                out.push_str("[\n");
                for (i, it) in items.iter().enumerate() {
                    out.push_str(&" ".repeat((indent + 1) * 4));
                    it.write(out, indent + 1);
                    if i + 1 < items.len() {
                        out.push(',');
                    }
                    out.push('\n');
                }
                out.push_str(&" ".repeat(indent * 4));
                out.push(']');
            }
            Json::Obj(pairs) => {
                out.push_str("{\n");
                for (i, (k, v)) in pairs.iter().enumerate() {
                    out.push_str(&" ".repeat((indent + 1) * 4));
                    out.push_str(&serde_json::to_string(k).unwrap_or_default());
                    out.push_str(": ");
                    v.write(out, indent + 1);
                    if i + 1 < pairs.len() {
                        out.push(',');
                    }
                    out.push('\n');
                }
                out.push_str(&" ".repeat(indent * 4));
                out.push('}');
            }
        }
    }
}

/// Prints an object's entries the way qemu-img prints "Format specific information":
/// `key: value` lines (dashes in keys become spaces), nested objects and lists indented by
/// four spaces, list items as `[i]:`.
pub fn human_tree(out: &mut String, indent: usize, pairs: &[(String, Json)]) {
    for (k, v) in pairs {
        let _ = write!(out, "{:1$}{2}:", "", indent * 4, k.replace('-', " "));
        human_value(out, indent, v);
    }
}

fn human_value(out: &mut String, indent: usize, v: &Json) {
    match v {
        Json::Obj(pairs) => {
            out.push('\n');
            human_tree(out, indent + 1, pairs);
        }
        Json::Arr(items) => {
            out.push('\n');
            for (i, it) in items.iter().enumerate() {
                let _ = write!(out, "{:1$}[{2}]:", "", (indent + 1) * 4, i);
                human_value(out, indent + 1, it);
            }
        }
        Json::Bool(b) => {
            let _ = writeln!(out, " {b}");
        }
        Json::Int(i) => {
            let _ = writeln!(out, " {i}");
        }
        Json::Str(s) => {
            let _ = writeln!(out, " {s}");
        }
    }
}

/// Formats a byte count like qemu's size_to_str: three significant digits, binary units.
pub fn human_size(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // Switch to the next unit once the number would reach 1000.
    let mut i = 0usize;
    #[allow(clippy::cast_precision_loss)]
    let mut v = val as f64;
    while v >= 1000.0 && i < SUFFIXES.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{} {}B", fmt_g3(v), SUFFIXES[i])
}

/// printf's `%0.3g` for non-negative values below 1000.
#[allow(clippy::cast_possible_truncation)]
pub fn fmt_g3(v: f64) -> String {
    if v <= 0.0 {
        return "0".into();
    }
    let exp = v.log10().floor() as i32;
    let mut dec = usize::try_from((2 - exp).max(0)).unwrap_or(0);
    let mut s = format!("{v:.dec$}");
    let rounded: f64 = s.parse().unwrap_or(v);
    if rounded > 0.0 && (rounded.log10().floor() as i32) > exp && dec > 0 {
        dec -= 1;
        s = format!("{v:.dec$}");
    }
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// A qemu-style progress indicator ("    (12.34/100%)"), drawn only when enabled.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    /// Creates a bar over `total` units, hidden unless `enabled`.
    pub fn new(enabled: bool, total: u64) -> Progress {
        if !enabled {
            return Progress { bar: None };
        }
        let bar = indicatif::ProgressBar::new(total.max(1));
        let style = indicatif::ProgressStyle::with_template(
            "    ({percent_precise}/100%) [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        Progress { bar: Some(bar) }
    }

    /// Sets the position.
    pub fn set(&self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
    }

    /// Completes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(405504), "396 KiB");
        assert_eq!(human_size(8 << 20), "8 MiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(1000), "0.977 KiB");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(1023 << 20), "0.999 GiB");
    }

    #[test]
    fn json_pretty_matches_qemu_layout() {
        let j = Json::obj(vec![
            ("a", Json::u(1)),
            ("b", Json::Arr(vec![Json::Bool(true)])),
        ]);
        assert_eq!(
            j.pretty(),
            "{\n    \"a\": 1,\n    \"b\": [\n        true\n    ]\n}"
        );
    }
}
