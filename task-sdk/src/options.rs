//! Reading a request's YAML options into a task's typed options.

use serde::de::DeserializeOwned;
use serde_yaml::Value;

/// Deserializes options as an application wrote them: Ruby's `to_yaml`
/// (`:key:` symbol keys, `!ruby/hash:…` and `!ruby/sym` tags) reads like
/// plain YAML. Empty input reads as an empty map (or `null`).
pub fn parse_options<T: DeserializeOwned>(input: &[u8]) -> Result<T, String> {
    let text = std::str::from_utf8(input).map_err(|_| "options are not UTF-8 text".to_string())?;
    let value: Value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_yaml::from_str(text).map_err(|e| format!("options are not valid YAML: {e}"))?
    };
    let value = normalize(value);
    if value.is_null() {
        // No options: try the type as null (Option, ()), else as an empty map.
        if let Ok(options) = serde_yaml::from_value(Value::Null) {
            return Ok(options);
        }
        return serde_yaml::from_value(Value::Mapping(Default::default()))
            .map_err(|e| e.to_string());
    }
    serde_yaml::from_value(value.clone()).map_err(|error| explain::<T>(&value, error))
}

/// `from_value`'s errors do not say where (`invalid type: string "soon",
/// expected u32`); deserializing the same value from text does
/// (`from: invalid type: …`, `steps[0].run: …`). Its line numbers are
/// dropped: they count lines of the normalised text, not of the row.
fn explain<T: DeserializeOwned>(value: &Value, error: serde_yaml::Error) -> String {
    let located = serde_yaml::to_string(value)
        .ok()
        .and_then(|text| serde_yaml::from_str::<T>(&text).err())
        .map(|error| error.to_string());
    let message = located.unwrap_or_else(|| error.to_string());
    match message.rfind(" at line ") {
        Some(at) if message[at..].contains(" column ") => message[..at].to_string(),
        _ => message,
    }
}

/// Drops tags and the leading colon of Ruby symbol keys, at any depth, but
/// for a tag that names an enum's variant as Rust spells one (`!Crop`: a
/// capital, then letters, digits and `_`): that is how serde_yaml writes a
/// variant with data (`mode: !Crop 5`), which `Enqueue::new` writes and `T`
/// reads back (before, it was dropped too, and such options were REJECTED
/// by the task that wrote them). Ruby's tags (`!ruby/hash:…`, `!ruby/sym`,
/// `!binary` for a string that is not UTF-8) and other lower-case ones are
/// dropped, as before.
fn normalize(value: Value) -> Value {
    match value {
        Value::Tagged(tagged) => {
            if !names_a_variant(&tagged.tag.to_string()) {
                normalize(tagged.value)
            } else {
                Value::Tagged(Box::new(serde_yaml::value::TaggedValue {
                    tag: tagged.tag,
                    value: normalize(tagged.value),
                }))
            }
        }
        Value::Mapping(mapping) => Value::Mapping(
            mapping
                .into_iter()
                .map(|(key, value)| (normalize_key(key), normalize(value)))
                .collect(),
        ),
        Value::Sequence(items) => Value::Sequence(items.into_iter().map(normalize).collect()),
        Value::String(text) => Value::String(text),
        other => other,
    }
}

/// Whether `tag` (`!Name`) names an enum variant as Rust spells one.
fn names_a_variant(tag: &str) -> bool {
    let name = tag.strip_prefix('!').unwrap_or(tag);
    name.starts_with(|c: char| c.is_ascii_uppercase())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn normalize_key(key: Value) -> Value {
    match normalize(key) {
        Value::String(text) => match text.strip_prefix(':') {
            Some(stripped) if !stripped.is_empty() => Value::String(stripped.to_string()),
            _ => Value::String(text),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Options {
        name: String,
        #[serde(default)]
        tags: Vec<String>,
        #[serde(default)]
        nested: BTreeMap<String, i64>,
    }

    #[test]
    fn ruby_yaml_reads_like_plain_yaml() {
        let ruby = b"--- !ruby/hash:ActiveSupport::HashWithIndifferentAccess\n:name: thumb\n:tags:\n- !ruby/sym a\n- b\n:nested:\n  :x: 1\n";
        let options: Options = parse_options(ruby).unwrap();
        assert_eq!(options.name, "thumb");
        assert_eq!(options.tags, vec!["a", "b"]);
        assert_eq!(options.nested["x"], 1);
    }

    #[test]
    fn an_enum_with_data_reads_back_as_it_was_written() {
        #[derive(Debug, PartialEq, serde::Serialize, Deserialize)]
        enum Mode {
            Crop(u32),
            Fit { w: u32 },
            Plain,
        }
        #[derive(Debug, PartialEq, serde::Serialize, Deserialize)]
        struct Opts {
            modes: Vec<Mode>,
        }
        let written = Opts {
            modes: vec![Mode::Crop(5), Mode::Fit { w: 3 }, Mode::Plain],
        };
        let yaml = serde_yaml::to_string(&written).unwrap();
        assert!(yaml.contains("!Crop"), "{yaml}");
        assert_eq!(parse_options::<Opts>(yaml.as_bytes()), Ok(written));
        // Ruby's `!binary`, Python's and YAML's global tags are dropped, as
        // Ruby's others are: a field read as any value sees the plain one.
        let python = b"!!python/object:__main__.Opts\nname: !binary dGh1bWI=\ntags: [!!str a]\n";
        let options: Options = parse_options(python).unwrap();
        assert_eq!(options.name, "dGh1bWI=");
        assert_eq!(options.tags, vec!["a".to_string()]);
        let any: serde_yaml::Value = parse_options(b"blob: !binary AAE=\n").unwrap();
        assert_eq!(any["blob"], serde_yaml::Value::String("AAE=".into()));
    }

    #[test]
    fn empty_options_read_as_an_empty_map() {
        #[derive(Deserialize)]
        struct None_ {
            #[serde(default)]
            created_from: Option<String>,
        }
        let options: None_ = parse_options(b"").unwrap();
        assert!(options.created_from.is_none());
    }

    #[test]
    fn options_that_do_not_fit_say_why() {
        let error = parse_options::<Options>(b"nme: x").unwrap_err();
        assert!(error.contains("name"), "{error}");
    }

    #[test]
    fn options_that_do_not_fit_name_the_key() {
        let error = parse_options::<Options>(b":name: x\n:nested:\n  :a: many\n").unwrap_err();
        assert_eq!(
            error,
            "nested.a: invalid type: string \"many\", expected i64"
        );
    }
}

/// The option names a derived `Deserialize` struct takes, for `--help`:
/// serde passes a struct's field names to its deserializer, so a probe that
/// asks for nothing else learns them. None for anything but a struct (a map,
/// `()`, a `#[serde(flatten)]` struct).
pub fn option_names<T: DeserializeOwned>() -> Option<&'static [&'static str]> {
    match T::deserialize(probe::Probe) {
        Err(probe::Found(fields)) => fields,
        Ok(_) => None,
    }
}

mod probe {
    use serde::de::{Deserializer, Visitor};
    use std::fmt;

    /// Carries the field names out of `deserialize_struct`.
    #[derive(Debug)]
    pub struct Found(pub Option<&'static [&'static str]>);

    impl fmt::Display for Found {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("probing option names")
        }
    }

    impl std::error::Error for Found {}

    impl serde::de::Error for Found {
        fn custom<T: fmt::Display>(_: T) -> Self {
            Found(None)
        }
    }

    pub struct Probe;

    impl<'de> Deserializer<'de> for Probe {
        type Error = Found;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Found> {
            Err(Found(None))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Found> {
            Err(Found(Some(fields)))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
}

#[cfg(test)]
mod option_name_tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn a_structs_option_names_are_found() {
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Options {
            title: String,
            #[serde(default)]
            max_len: usize,
        }
        assert_eq!(option_names::<Options>(), Some(&["title", "max_len"][..]));
        assert_eq!(option_names::<()>(), None);
        assert_eq!(
            option_names::<std::collections::BTreeMap<String, String>>(),
            None
        );
    }
}
