//! Attribute parsing shared by the three derives: keys read with `parse_nested_meta`, values
//! kept as the user's syn nodes so that every error can point at them.

use proc_macro2::{TokenStream, TokenTree};
use syn::{
    Attribute, Expr, ExprLit, Lit, LitInt, LitStr, Path, Token, Type, meta::ParseNestedMeta,
};

use crate::errors::Errors;

/// A key that may appear once. Remembers the key's path to report a second occurrence.
pub(crate) struct Setting<T> {
    key: Option<Path>,
    value: Option<T>,
}

impl<T> Default for Setting<T> {
    fn default() -> Self {
        Self {
            key: None,
            value: None,
        }
    }
}

impl<T> Setting<T> {
    /// Stores `value` for the key at `path`, or reports a duplicate key on this second `path`.
    /// `value` is `None` when the value was wrong (already reported): the key still counts.
    pub(crate) fn set(&mut self, errors: &mut Errors, attr: &str, path: &Path, value: Option<T>) {
        if self.key.is_some() {
            errors.spanned(
                path,
                format_args!(
                    "duplicate `{}` key in `#[{attr}(...)]`",
                    path_to_string(path)
                ),
            );
        } else {
            self.key = Some(path.clone());
            self.value = value;
        }
    }

    /// Whether the key was written, even with a wrong value.
    pub(crate) fn is_present(&self) -> bool {
        self.key.is_some()
    }

    pub(crate) fn value(&self) -> Option<&T> {
        self.value.as_ref()
    }

    pub(crate) fn into_value(self) -> Option<T> {
        self.value
    }
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
