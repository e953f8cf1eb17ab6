//! qemu-img style argument parsing: getopt-like short and long options, `-o` option
//! lists, sizes, `--object secret,...` and `--image-opts` strings.

use std::collections::HashMap;

use crate::ImgError;

/// How an option takes a value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    /// A flag.
    No,
    /// Needs a value.
    Yes,
    /// `-r` style: value only when attached or when the next word is not an option.
    Optional,
}

/// Parsed options: each option name (short letter or long name) with its values in order.
#[derive(Debug, Default)]
pub struct Parsed {
    opts: Vec<(String, Option<String>)>,
    /// Positional arguments.
    pub free: Vec<String>,
}

impl Parsed {
    /// Whether a flag was given.
    pub fn has(&self, name: &str) -> bool {
        self.opts.iter().any(|(n, _)| n == name)
    }

    /// The last value of an option.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Every value of an option, in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.opts
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, v)| v.as_deref())
            .collect()
    }
}

/// Parses `args` against `short` (letter, arg kind) and `long` (name, arg kind) options.
/// Long options may be written `--name=value` or `--name value`.
pub fn parse(
    args: &[String],
    short: &[(char, Arg)],
    long: &[(&str, Arg)],
) -> Result<Parsed, ImgError> {
    let mut p = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            p.free.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(rest) = a.strip_prefix("--") {
            let (name, inline) = match rest.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (rest, None),
            };
            let Some(&(_, kind)) = long.iter().find(|(n, _)| *n == name) else {
                return Err(ImgError::Usage(format!("unrecognized option '--{name}'")));
            };
            let value = match kind {
                Arg::No => {
                    if inline.is_some() {
                        return Err(ImgError::Usage(format!(
                            "option '--{name}' doesn't allow an argument"
                        )));
                    }
                    None
                }
                Arg::Yes => match inline {
                    Some(v) => Some(v),
                    None if i < args.len() => {
                        i += 1;
                        Some(args[i - 1].clone())
                    }
                    None => {
                        return Err(ImgError::Usage(format!(
                            "option '--{name}' requires an argument"
                        )))
                    }
                },
                Arg::Optional => inline,
            };
            p.opts.push((name.to_owned(), value));
            continue;
        }
        if a.len() > 1 && a.starts_with('-') {
            let chars: Vec<char> = a[1..].chars().collect();
            let mut k = 0;
            while k < chars.len() {
                let c = chars[k];
                k += 1;
                let Some(&(_, kind)) = short.iter().find(|(s, _)| *s == c) else {
                    return Err(ImgError::Usage(format!("invalid option -- '{c}'")));
                };
                match kind {
                    Arg::No => p.opts.push((c.to_string(), None)),
                    Arg::Yes | Arg::Optional => {
                        let attached: String = chars[k..].iter().collect();
                        let value = if !attached.is_empty() {
                            Some(attached)
                        } else if kind == Arg::Yes {
                            if i >= args.len() {
                                return Err(ImgError::Usage(format!(
                                    "option requires an argument -- '{c}'"
                                )));
                            }
                            i += 1;
                            Some(args[i - 1].clone())
                        } else if i < args.len() && !args[i].starts_with('-') && args.len() - i > 1
                        {
                            i += 1;
                            Some(args[i - 1].clone())
                        } else {
                            None
                        };
                        p.opts.push((c.to_string(), value));
                        break;
                    }
                }
            }
            continue;
        }
        p.free.push(a.clone());
    }
    Ok(p)
}

/// Splits a qemu option string `a=b,c=d` (a doubled comma is a literal comma).
pub fn split_opts(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut parts = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for part in parts {
        if part.is_empty() {
            continue;
        }
        match part.split_once('=') {
            Some((k, v)) => out.push((k.to_owned(), v.to_owned())),
            None => out.push((part, String::new())),
        }
    }
    out
}

/// Parses a size like qemu: plain bytes or with a k/M/G/T/P/E suffix (binary), decimals ok.
pub fn parse_size(s: &str) -> Result<u64, ImgError> {
    let bad = || {
        ImgError::Usage(format!(
            "Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes. ('{s}')"
        ))
    };
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let mult: u64 = match suffix {
        "" | "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return Err(bad()),
    };
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let v = f * mult as f64;
    if !(0.0..1.8e19).contains(&v) {
        return Err(bad());
    }
    // Float to integer: the range was checked above.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(v as u64)
}

/// Secrets from `--object secret,id=ID,data=...|file=...`.
#[derive(Debug, Default, Clone)]
pub struct Secrets(HashMap<String, Vec<u8>>);

impl Secrets {
    /// Collects every `--object` value.
    pub fn from_objects(objects: &[&str]) -> Result<Secrets, ImgError> {
        let mut map = HashMap::new();
        for obj in objects {
            let kv = split_opts(obj);
            let ty = kv
                .first()
                .map(|(k, v)| if v.is_empty() { k.clone() } else { v.clone() })
                .unwrap_or_default();
            let ty = kv
                .iter()
                .find(|(k, _)| k == "qom-type")
                .map_or(ty, |(_, v)| v.clone());
            if ty != "secret" {
                return Err(ImgError::Usage(format!("unsupported object type '{ty}'")));
            }
            let get = |key: &str| kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            let id = get("id").ok_or_else(|| ImgError::Usage("secret object needs id=".into()))?;
            let data = match (get("data"), get("file")) {
                (Some(d), None) => d.into_bytes(),
                (None, Some(f)) => std::fs::read(&f)
                    .map_err(|e| ImgError::Msg(format!("could not read secret file '{f}': {e}")))?,
                _ => {
                    return Err(ImgError::Usage(
                        "secret object needs exactly one of data= or file=".into(),
                    ))
                }
            };
            let data = match get("format").as_deref() {
                Some("base64") => base64_decode(&data)
                    .ok_or_else(|| ImgError::Usage("secret is not valid base64".into()))?,
                _ => data,
            };
            map.insert(id, data);
        }
        Ok(Secrets(map))
    }

    /// Looks a secret up by id.
    pub fn get(&self, id: &str) -> Result<Vec<u8>, ImgError> {
        self.0
            .get(id)
            .cloned()
            .ok_or_else(|| ImgError::Msg(format!("No secret with id '{id}'")))
    }
}

fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let clean: Vec<u8> = s
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::new();
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        let mut n = 0;
        for &c in chunk {
            if c == b'=' {
                break;
            }
            acc = (acc << 6) | val(c)?;
            n += 1;
        }
        let bytes = acc.to_be_bytes();
        match n {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&[((acc >> 10) & 0xff) as u8, ((acc >> 2) & 0xff) as u8]),
            2 => out.push(((acc >> 4) & 0xff) as u8),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_qemu_style_options() {
        let p = parse(
            &v(&[
                "-f",
                "qcow2",
                "-qo",
                "cluster_size=4k",
                "--output=json",
                "a.img",
                "1G",
            ]),
            &[('f', Arg::Yes), ('q', Arg::No), ('o', Arg::Yes)],
            &[("output", Arg::Yes)],
        )
        .unwrap();
        assert_eq!(p.get("f"), Some("qcow2"));
        assert!(p.has("q"));
        assert_eq!(p.get("o"), Some("cluster_size=4k"));
        assert_eq!(p.get("output"), Some("json"));
        assert_eq!(p.free, v(&["a.img", "1G"]));
    }

    #[test]
    fn repair_option_value_is_optional() {
        let short = [('r', Arg::Optional)];
        let p = parse(&v(&["-r", "all", "x.qcow2"]), &short, &[]).unwrap();
        assert_eq!(p.get("r"), Some("all"));
        let p = parse(&v(&["-r", "x.qcow2"]), &short, &[]).unwrap();
        assert!(p.has("r") && p.get("r").is_none());
        assert_eq!(p.free, v(&["x.qcow2"]));
    }

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn option_lists_handle_escaped_commas() {
        assert_eq!(
            split_opts("a=1,b=x,,y,c"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x,y".into()),
                ("c".into(), "".into())
            ]
        );
    }

    #[test]
    fn secrets_from_objects() {
        let s = Secrets::from_objects(&[
            "secret,id=s0,data=pw",
            "secret,id=s1,data=cHc=,format=base64",
        ])
        .unwrap();
        assert_eq!(s.get("s0").unwrap(), b"pw");
        assert_eq!(s.get("s1").unwrap(), b"pw");
        assert!(s.get("nope").is_err());
    }
}
