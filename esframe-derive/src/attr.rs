//! Attribute parsing shared by the three derives: keys read with `parse_nested_meta`, values
//! kept as the user's syn nodes so that every error can point at them.

use proc_macro2::{TokenStream, TokenTree};
use syn::{
    Attribute, Expr, ExprLit, Lit, LitInt, LitStr, Path, Token, Type, meta::ParseNestedMeta,
};

use crate::errors::{Errors, closest};

/// A key that may appear once. Remembers the key's path to report a second occurrence.
pub(crate) struct Setting<T> {
    key: Option<Path>,
    /// Set from a misspelled key: a correctly spelled one replaces it.
    guessed: bool,
    value: Option<T>,
}

impl<T> Default for Setting<T> {
    fn default() -> Self {
        Self {
            key: None,
            guessed: false,
            value: None,
        }
    }
}

impl<T> Setting<T> {
    /// Stores `value` for `key`, or reports a duplicate key on this second occurrence.
    /// `value` is `None` when the value was wrong (already reported): the key still counts.
    /// A misspelled key (already reported) never is a duplicate: it only fills in a key not
    /// written, and a correctly spelled one written later replaces it.
    pub(crate) fn set(&mut self, errors: &mut Errors, attr: &str, key: &Key, value: Option<T>) {
        match (&self.key, key.guessed) {
            (Some(_), true) => {}
            (Some(_), false) if !self.guessed => errors.spanned(
                &key.path,
                format_args!("duplicate `{}` key in `#[{attr}(...)]`", key.name),
            ),
            _ => {
                self.key = Some(key.path.clone());
                self.guessed = key.guessed;
                self.value = value;
            }
        }
    }

    /// Whether the key was written, even with a wrong value or misspelled.
    pub(crate) fn is_present(&self) -> bool {
        self.key.is_some()
    }

    pub(crate) fn value(&self) -> Option<&T> {
        self.value.as_ref()
    }

    pub(crate) fn into_value(self) -> Option<T> {
        self.value
    }

    /// Drops a value found wrong after parsing (reported by the caller): the key still counts.
    pub(crate) fn discard_value(&mut self) {
        self.value = None;
    }
}

/// A key of an attribute, as [`key`] recognized it.
pub(crate) struct Key {
    /// The key as the attribute spells it.
    pub(crate) name: &'static str,
    /// The key as written.
    pub(crate) path: Path,
    /// Written misspelled (already reported): read its value as `name`'s, reporting nothing
    /// more, so that one misspelling is one error rather than a "missing key" and the type
    /// errors of an impl without the value.
    pub(crate) guessed: bool,
}

impl Key {
    /// `errors`, or for a guessed key a sink whose errors are dropped.
    pub(crate) fn errors<'a>(
        &self,
        errors: &'a mut Errors,
        sink: &'a mut Errors,
    ) -> &'a mut Errors {
        if self.guessed { sink } else { errors }
    }
}

/// The key of `meta` among `known`, the keys valid at this place. A key not among them is
/// reported on its path: as a misspelling of the known key it is closest to, which is returned
/// guessed, or else listing `expected`, and then its value is skipped and `None` returned.
pub(crate) fn key(
    errors: &mut Errors,
    meta: &ParseNestedMeta<'_>,
    attr: &str,
    known: &[&'static str],
    expected: &str,
) -> syn::Result<Option<Key>> {
    let written = path_to_string(&meta.path);
    let (name, guessed) = match known.iter().find(|key| meta.path.is_ident(key)) {
        Some(name) => (*name, false),
        None => match closest(&written, known.iter().copied()) {
            Some(name) => {
                errors.spanned(
                    &meta.path,
                    format_args!("unknown `{attr}` key `{written}`; did you mean `{name}`?"),
                );
                (name, true)
            }
            None => {
                unknown_key(errors, meta, attr, expected)?;
                return Ok(None);
            }
        },
    };
    Ok(Some(Key {
        name,
        path: meta.path.clone(),
        guessed,
    }))
}

/// Parses each `#[NAME(...)]` attribute in `attrs` with `each_key`, recording syntax errors and
/// going on with the next attribute.
pub(crate) fn for_each_key(
    attrs: &[Attribute],
    name: &str,
    errors: &mut Errors,
    mut each_key: impl FnMut(&mut Errors, ParseNestedMeta<'_>) -> syn::Result<()>,
) {
    for attr in attrs.iter().filter(|attr| attr.path().is_ident(name)) {
        let result = attr.parse_nested_meta(|meta| each_key(errors, meta));
        errors.check(result);
    }
}

/// Reports every `#[NAME(...)]` attribute in `attrs`: the attribute is not read at this place.
pub(crate) fn reject_attrs(attrs: &[Attribute], name: &str, errors: &mut Errors, place: &str) {
    for attr in attrs.iter().filter(|attr| attr.path().is_ident(name)) {
        errors.spanned(
            attr,
            format_args!("`#[{name}(...)]` is not allowed on {place}"),
        );
    }
}

/// Reports a key this attribute does not know, listing the ones it does, and skips its value.
pub(crate) fn unknown_key(
    errors: &mut Errors,
    meta: &ParseNestedMeta<'_>,
    attr: &str,
    expected: &str,
) -> syn::Result<()> {
    errors.spanned(
        &meta.path,
        format_args!(
            "unknown `{attr}` key `{}`, expected {expected}",
            path_to_string(&meta.path)
        ),
    );
    skip_value(meta)
}

/// Consumes whatever follows a key (`= value`, `(...)` or nothing) so that parsing can go on with
/// the next key. Used for keys that are reported as errors and for other crates' attributes.
pub(crate) fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    let input = meta.input;
    if input.peek(Token![=]) {
        input.parse::<Token![=]>()?;
        // A type or an expression may contain commas inside `<...>`: try them whole first.
        // (Type first: as an expression, `Vec<u8, A>` would stop at the comma.)
        let fork = input.fork();
        if fork.parse::<Type>().is_ok() && (fork.is_empty() || fork.peek(Token![,])) {
            input.parse::<Type>()?;
            return Ok(());
        }
        let fork = input.fork();
        if fork.parse::<Expr>().is_ok() && (fork.is_empty() || fork.peek(Token![,])) {
            input.parse::<Expr>()?;
            return Ok(());
        }
    }
    while !input.is_empty() && !input.peek(Token![,]) {
        input.parse::<TokenTree>()?;
    }
    Ok(())
}

/// Reports a value after a key that takes none, such as `#[command(aggregate_id = x)]` on a field.
pub(crate) fn reject_value(errors: &mut Errors, meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.is_empty() || meta.input.peek(Token![,]) {
        return Ok(());
    }
    let fork = meta.input.fork();
    let mut value = TokenStream::new();
    while !fork.is_empty() && !fork.peek(Token![,]) {
        value.extend([fork.parse::<TokenTree>()?]);
    }
    errors.spanned(
        value,
        format_args!(
            "`{}` takes no value here, write it alone",
            path_to_string(&meta.path)
        ),
    );
    skip_value(meta)
}

/// Reads `key = <integer literal of at least 1>`, such as a schema version. Reports anything
/// else on the value and returns `None`.
pub(crate) fn positive_int(
    errors: &mut Errors,
    meta: &ParseNestedMeta<'_>,
) -> syn::Result<Option<u32>> {
    let expr: Expr = meta.value()?.parse()?;
    let value = match ungroup(&expr) {
        Expr::Lit(ExprLit {
            lit: Lit::Int(int), ..
        }) => positive_u32(int),
        _ => None,
    };
    if value.is_none() {
        errors.spanned(
            &expr,
            format_args!(
                "`{}` must be an integer literal of at least 1 that fits in a `u32`, e.g. `{0} = 2`",
                path_to_string(&meta.path)
            ),
        );
    }
    Ok(value)
}

fn positive_u32(int: &LitInt) -> Option<u32> {
    if !matches!(int.suffix(), "" | "u32") {
        return None;
    }
    int.base10_parse::<u32>().ok().filter(|value| *value >= 1)
}

/// Reads `key = "<name>"`: a string literal, not empty, without whitespace or control
/// characters. Reports anything else on the value and returns `None`.
pub(crate) fn name(
    errors: &mut Errors,
    meta: &ParseNestedMeta<'_>,
    example: &str,
) -> syn::Result<Option<LitStr>> {
    let expr: Expr = meta.value()?.parse()?;
    let key = path_to_string(&meta.path);
    let Expr::Lit(ExprLit {
        lit: Lit::Str(lit), ..
    }) = ungroup(&expr)
    else {
        errors.spanned(
            &expr,
            format_args!("`{key}` must be a string literal, e.g. `{key} = \"{example}\"`"),
        );
        return Ok(None);
    };
    let value = lit.value();
    if value.is_empty() {
        errors.spanned(lit, format_args!("`{key}` must not be empty"));
        Ok(None)
    } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        errors.spanned(
            lit,
            format_args!("`{key}` must not contain whitespace or control characters"),
        );
        Ok(None)
    } else {
        Ok(Some(lit.clone()))
    }
}

/// Looks through the invisible groups a `macro_rules!` macro wraps around `$x:expr` fragments.
pub(crate) fn ungroup(expr: &Expr) -> &Expr {
    match expr {
        Expr::Group(group) => ungroup(&group.expr),
        _ => expr,
    }
}

/// `a::b` for error messages.
pub(crate) fn path_to_string(path: &Path) -> String {
    let segments: Vec<String> = path
        .segments
        .iter()
        .map(|segment| segment.ident.to_string())
        .collect();
    segments.join("::")
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::parse_quote;

    fn collect(attr: Attribute) -> (Vec<String>, Vec<Option<u32>>) {
        let mut errors = Errors::new();
        let mut versions = Vec::new();
        for_each_key(&[attr], "event", &mut errors, |errors, meta| {
            if meta.path.is_ident("version") {
                versions.push(positive_int(errors, &meta)?);
                Ok(())
            } else {
                unknown_key(errors, &meta, "event", "`version`")
            }
        });
        let messages = match errors.finish() {
            Ok(()) => Vec::new(),
            Err(tokens) => tokens
                .into_iter()
                .filter_map(|token| match token {
                    TokenTree::Group(group) => Some(group.stream().to_string()),
                    _ => None,
                })
                .collect(),
        };
        (messages, versions)
    }

    #[test]
    fn reads_positive_integers_only() {
        let (errors, versions) = collect(
            parse_quote!(#[event(version = 3, version = 0, version = "2", version = 7u32, version = 1i64)]),
        );
        assert_eq!(versions, [Some(3), None, None, Some(7), None]);
        assert_eq!(errors.len(), 3, "{errors:?}");
    }

    /// The version `attr` sets, with `version` read through [`key`], and the errors as tokens.
    fn read_version(attr: Attribute) -> (Option<u32>, String) {
        let mut errors = Errors::new();
        let mut version = Setting::default();
        for_each_key(&[attr], "event", &mut errors, |errors, meta| {
            if let Some(key) = key(errors, &meta, "event", &["version"], "`version`")? {
                let mut sink = Errors::new();
                let errors = key.errors(errors, &mut sink);
                let value = positive_int(errors, &meta)?;
                version.set(errors, "event", &key, value);
            }
            Ok(())
        });
        let errors = errors.finish().err().unwrap_or_default().to_string();
        (version.into_value(), errors)
    }

    #[test]
    fn a_misspelled_key_is_one_error_and_still_read() {
        for (attr, expected) in [
            (parse_quote!(#[event(versoin = 2)]), Some(2)),
            (parse_quote!(#[event(versoin = 2, version = 3)]), Some(3)),
            (parse_quote!(#[event(version = 3, versoin = 2)]), Some(3)),
            // The value's own mistake is reported once the key is spelled right.
            (parse_quote!(#[event(versoin = 0)]), None),
        ] {
            let (version, errors) = read_version(attr);
            assert_eq!(version, expected, "{errors}");
            assert_eq!(errors.matches("compile_error").count(), 1, "{errors}");
            assert!(errors.contains("did you mean `version`?"), "{errors}");
        }
        let (version, errors) = read_version(parse_quote!(#[event(versoin = 2, verison = 4)]));
        assert_eq!(version, Some(2), "{errors}");
        assert_eq!(errors.matches("did you mean").count(), 2, "{errors}");
        let (version, errors) = read_version(parse_quote!(#[event(version = 1, version = 2)]));
        assert_eq!(version, Some(1));
        assert!(errors.contains("duplicate `version`"), "{errors}");
    }

    #[test]
    fn unknown_keys_do_not_stop_parsing() {
        let (errors, versions) = collect(parse_quote!(#[event(
            rename = Vec<u8, Global>, flag, list(a, b = "c"), version = 2
        )]));
        assert_eq!(versions, [Some(2)]);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].contains("unknown `event` key `rename`, expected `version`"));
    }
}
