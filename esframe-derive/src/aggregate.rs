//! `#[derive(Aggregate)]`: names the associated types and delegates to the inherent `handle`
//! and `apply` functions the user writes.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::{
    Data, DeriveInput, Generics, Ident, LitStr, Path, Token, Type, ext::IdentExt,
    meta::ParseNestedMeta, parse_quote,
};

use crate::{
    attr::{self, Setting},
    errors::Errors,
    generics,
};

/// Expands `#[derive(Aggregate)]`: the impl, or the errors and a fallback impl.
pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let mut errors = Errors::new();
    let (model, attrs) = AggregateInput::from_syn(input, &mut errors);
    errors.expand_or_fallback(model, |model| model.expand(), || fallback(input, &attrs))
}

/// The keys of `#[aggregate(...)]` as written.
#[derive(Default)]
struct AggregateAttrs {
    /// The first `aggregate` attribute's path, where missing keys are reported.
    attr_path: Option<Path>,
    name: Setting<LitStr>,
    command: Setting<Type>,
    event: Setting<Type>,
    error: Setting<Type>,
    services: Setting<Type>,
    snapshot_version: Setting<u32>,
}

const KEYS: &[&str] = &[
    "name",
    "command",
    "event",
    "error",
    "services",
    "snapshot_version",
];
const EXPECTED: &str = "`name`, `command`, `event`, `error`, `services` or `snapshot_version`";

/// A validated aggregate.
struct AggregateInput<'a> {
    ident: &'a Ident,
    generics: &'a Generics,
    /// `Aggregate::TYPE`.
    name: String,
    command: Type,
    event: Type,
    error: Type,
    services: Type,
    snapshot_version: u32,
}

impl<'a> AggregateInput<'a> {
    /// Parses and validates the input, recording every mistake in `errors`. Also returns the
    /// keys as read, for the fallback impl.
    fn from_syn(input: &'a DeriveInput, errors: &mut Errors) -> (Option<Self>, AggregateAttrs) {
        if let Data::Union(data) = &input.data {
            errors.spanned(
                data.union_token,
                "`#[derive(Aggregate)]` supports structs and enums, not unions",
            );
        }
        generics::reject_lifetimes(
            &input.generics,
            errors,
            "aggregates must own their state: `#[derive(Aggregate)]` does not support lifetime \
             parameters",
        );
        reject_inner_attrs(input, errors);

        let mut attrs = AggregateAttrs::default();
        for attr in input
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("aggregate"))
        {
            if attrs.attr_path.is_none() {
                attrs.attr_path = Some(attr.path().clone());
            }
        }
        attr::for_each_key(&input.attrs, "aggregate", errors, |errors, meta| {
            let Some(key) = attr::key(errors, &meta, "aggregate", KEYS, EXPECTED)? else {
                return Ok(());
            };
            let mut sink = Errors::new();
            let errors = key.errors(errors, &mut sink);
            match key.name {
                "name" => {
                    let value = attr::name(errors, &meta, "account")?;
                    attrs.name.set(errors, "aggregate", &key, value);
                }
                "snapshot_version" => {
                    let value = attr::positive_int(errors, &meta)?;
                    attrs.snapshot_version.set(errors, "aggregate", &key, value);
                }
                type_key => {
                    let value = type_value(errors, &meta)?;
                    attrs
                        .type_setting(type_key)
                        .set(errors, "aggregate", &key, value);
                }
            }
            Ok(())
        });
        report_missing(input, &attrs, errors);

        let model = (|| {
            Some(Self {
                ident: &input.ident,
                generics: &input.generics,
                name: match attrs.name.value() {
                    Some(name) => name.value(),
                    None => input.ident.unraw().to_string(),
                },
                command: attrs.command.value()?.clone(),
                event: attrs.event.value()?.clone(),
                error: attrs.error.value()?.clone(),
                services: match attrs.services.value() {
                    Some(services) => services.clone(),
                    None => parse_quote!(()),
                },
                snapshot_version: attrs.snapshot_version.value().copied().unwrap_or(1),
            })
        })();
        (model, attrs)
    }

    fn expand(&self) -> TokenStream {
        let ident = self.ident;
        let (_, ty_generics, _) = self.generics.split_for_impl();
        // A generic aggregate's supertraits and serde support: a bound in the `where` clause, so
        // that a type argument without them is reported where the aggregate is used with it.
        let generics = if self.generics.params.is_empty() {
            self.generics.clone()
        } else {
            generics::with_predicates(
                self.generics,
                [parse_quote! {
                    #ident #ty_generics: ::core::default::Default
                        + ::esframe_core::__private::serde::Serialize
                        + ::esframe_core::__private::serde::de::DeserializeOwned
                        + ::core::marker::Send
                        + ::core::marker::Sync
                        + 'static
                }],
            )
        };
        let (impl_generics, _, where_clause) = generics.split_for_impl();
        let json = quote!(::esframe_core::__private::serde_json);
        let name = &self.name;
        let snapshot_version = self.snapshot_version;
        let (command, event, error, services) =
            (&self.command, &self.event, &self.error, &self.services);

        // `Self::handle` finds the inherent fn first. Without one it would silently find the
        // trait's own `handle` (and recurse), so two local traits add a second `handle` and
        // `apply` for this type: a missing inherent fn becomes an ambiguity error on the type's
        // name that names the trait `AddAnInherentFnHandle` / `AddAnInherentFnApply` (it also
        // catches an inherent fn that is not visible here). Only the fn name is spanned on the
        // type's name: with `Self` there too, rustc would suggest rewriting the `struct` line as
        // `struct <Account as Aggregate>::Account`.
        let handle = Ident::new("handle", ident.span());
        let apply = Ident::new("apply", ident.span());
        let call_handle = quote!(Self::#handle);
        let call_apply = quote!(Self::#apply);
        // A plain aggregate's serde functions come from one `const`, spanned on its name: a
        // missing serde derive is one error there, and the impl's bodies need no serde bound.
        let (serde_const, serde) = if self.generics.params.is_empty() {
            let serde_const = quote_spanned! {ident.span()=>
                const __ESFRAME_SERDE: ::esframe_core::__private::StateSerde<#ident> =
                    ::esframe_core::__private::state_serde::<#ident>();
            };
            (Some(serde_const), quote!(__ESFRAME_SERDE))
        } else {
            (
                None,
                quote!(::esframe_core::__private::state_serde::<Self>()),
            )
        };
        // The user's `handle` goes through a bound whose error says to make it an `async fn`,
        // spanned on the type's name (where rustc reports it once). The output names the error
        // type as written: `Self::Error` would require `Self: Aggregate` there, reporting a
        // missing `Default` a second time.
        let handle_output = quote!(::core::result::Result<(), #error>);
        let call_handle = quote_spanned! {ident.span()=>
            let future = #call_handle(decision, command, services);
            ::esframe_core::__private::async_handle::<#handle_output, _>(future)
        };
        let handle_future = quote_spanned! {ident.span()=>
            impl ::core::future::Future<Output = #handle_output> + ::core::marker::Send
        };

        quote! {
            const _: () = {
                #[allow(dead_code)]
                trait AddAnInherentFnHandle {
                    fn handle() {}
                }
                impl #impl_generics AddAnInherentFnHandle for #ident #ty_generics #where_clause {}

                #[allow(dead_code)]
                trait AddAnInherentFnApply {
                    fn apply() {}
                }
                impl #impl_generics AddAnInherentFnApply for #ident #ty_generics #where_clause {}

                #serde_const

                #[automatically_derived]
                impl #impl_generics ::esframe_core::Aggregate for #ident #ty_generics #where_clause {
                    const TYPE: &'static ::core::primitive::str = #name;
                    const SNAPSHOT_VERSION: ::core::primitive::u32 = #snapshot_version;

                    type Command = #command;
                    type Event = #event;
                    type Error = #error;
                    type Services = #services;

                    fn handle(
                        decision: &mut ::esframe_core::Decision<'_, Self>,
                        command: &Self::Command,
                        services: &Self::Services,
                    ) -> #handle_future {
                        #call_handle
                    }

                    fn apply(&mut self, event: &Self::Event) {
                        #call_apply(self, event)
                    }

                    fn to_snapshot(&self) -> ::core::result::Result<#json::Value, #json::Error> {
                        (#serde.encode)(self)
                    }

                    fn from_snapshot(
                        state: &#json::Value,
                    ) -> ::core::result::Result<Self, #json::Error> {
                        (#serde.decode)(state)
                    }
                }
            };
        }
    }
}

impl AggregateAttrs {
    /// The setting of `key`, one of the keys whose value is a type.
    fn type_setting(&mut self, key: &str) -> &mut Setting<Type> {
        match key {
            "command" => &mut self.command,
            "event" => &mut self.event,
            "error" => &mut self.error,
            _ => &mut self.services, // "services"
        }
    }
}

/// Reads `key = Type`; reports anything else on the value and returns `None`.
fn type_value(errors: &mut Errors, meta: &ParseNestedMeta<'_>) -> syn::Result<Option<Type>> {
    let input = meta.value()?;
    let fork = input.fork();
    if fork.parse::<Type>().is_ok() && (fork.is_empty() || fork.peek(Token![,])) {
        return Ok(Some(input.parse()?));
    }
    let mut value = TokenStream::new();
    while !input.is_empty() && !input.peek(Token![,]) {
        value.extend([input.parse::<proc_macro2::TokenTree>()?]);
    }
    let key = attr::path_to_string(&meta.path);
    errors.spanned(
        value,
        format_args!(
            "`{key}` must be a type, e.g. `{key} = Account{}`",
            upper_first(&key)
        ),
    );
    Ok(None)
}

fn upper_first(key: &str) -> String {
    let mut chars = key.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// Reports in one error the required keys that are missing: on the `aggregate` attribute, or on
/// the type's name when there is no such attribute.
fn report_missing(input: &DeriveInput, attrs: &AggregateAttrs, errors: &mut Errors) {
    let missing: Vec<&str> = [
        ("command", &attrs.command),
        ("event", &attrs.event),
        ("error", &attrs.error),
    ]
    .into_iter()
    .filter(|(_, setting)| !setting.is_present())
    .map(|(key, _)| key)
    .collect();
    let list = match missing.as_slice() {
        [] => return,
        [one] => format!("`{one}`"),
        [first, second] => format!("`{first}` and `{second}`"),
        [first @ .., last] => {
            let first: Vec<String> = first.iter().map(|key| format!("`{key}`")).collect();
            format!("{} and `{last}`", first.join(", "))
        }
    };
    let example = "e.g. `#[aggregate(command = AccountCommand, event = AccountEvent, \
                   error = AccountError)]`";
    match &attrs.attr_path {
        Some(path) => errors.spanned(
            path,
            format_args!(
                "missing {list} in `#[aggregate(...)]`: an aggregate names the command type it \
                 handles, the event type it emits and its error type, {example}"
            ),
        ),
        None => errors.spanned(
            &input.ident,
            format_args!(
                "`#[derive(Aggregate)]` needs `#[aggregate(...)]` naming the command type \
                 `{}` handles, the event type it emits and its error type, {example}",
                input.ident
            ),
        ),
    }
}

/// `#[aggregate(...)]` belongs on the type only.
fn reject_inner_attrs(input: &DeriveInput, errors: &mut Errors) {
    let place = "a field or variant: it goes on the type";
    match &input.data {
        Data::Struct(data) => {
            for field in &data.fields {
                attr::reject_attrs(&field.attrs, "aggregate", errors, place);
            }
        }
        Data::Enum(data) => {
            for variant in &data.variants {
                attr::reject_attrs(&variant.attrs, "aggregate", errors, place);
                for field in &variant.fields {
                    attr::reject_attrs(&field.attrs, "aggregate", errors, place);
                }
            }
        }
        Data::Union(data) => {
            for field in &data.fields.named {
                attr::reject_attrs(&field.attrs, "aggregate", errors, place);
            }
        }
    }
}

/// An impl whose bodies never run, emitted with the errors so that the user's `handle` and
/// `apply` (which mention `Decision<'_, Self>`) and code using the type as an `Aggregate` report
/// nothing more. A type missing from the attribute is replaced by an uninhabited placeholder.
fn fallback(input: &DeriveInput, attrs: &AggregateAttrs) -> TokenStream {
    let ident = &input.ident;
    let generics = generics::with_predicates(
        &generics::fallback_generics(&input.generics),
        [parse_quote!(for<'__esframe> Self: ::core::default::Default)],
    );
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    let json = quote!(::esframe_core::__private::serde_json);
    let unreachable = quote!(::core::panic!("`#[derive(Aggregate)]` failed"));
    let placeholder = quote!(MissingInAggregateAttribute);
    let or_placeholder = |setting: &Setting<Type>| match setting.value() {
        Some(ty) => quote!(#ty),
        None => placeholder.clone(),
    };
    let command = or_placeholder(&attrs.command);
    let event = or_placeholder(&attrs.event);
    let error = or_placeholder(&attrs.error);
    let services = match attrs.services.value() {
        Some(ty) => quote!(#ty),
        None => quote!(()),
    };
    let needs_placeholder = [&attrs.command, &attrs.event, &attrs.error]
        .iter()
        .any(|setting| setting.value().is_none());
    let placeholder = needs_placeholder.then(|| {
        quote! {
            #[allow(dead_code)]
            enum MissingInAggregateAttribute {}

            impl ::core::fmt::Debug for MissingInAggregateAttribute {
                fn fmt(&self, _: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                    match *self {}
                }
            }

            impl ::core::fmt::Display for MissingInAggregateAttribute {
                fn fmt(&self, _: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                    match *self {}
                }
            }

            impl ::std::error::Error for MissingInAggregateAttribute {}

            impl ::esframe_core::Command for MissingInAggregateAttribute {
                fn aggregate_id(&self) -> ::std::string::String {
                    match *self {}
                }
            }

            impl ::esframe_core::Event for MissingInAggregateAttribute {
                fn event_types() -> &'static [::esframe_core::EventType] {
                    &[]
                }
                fn event_type(&self) -> &'static ::core::primitive::str {
                    match *self {}
                }
                fn schema_version(&self) -> ::core::primitive::u32 {
                    match *self {}
                }
                fn to_payload(&self) -> ::core::result::Result<#json::Value, #json::Error> {
                    match *self {}
                }
                fn from_payload(
                    _: &::core::primitive::str,
                    _: &::esframe_core::Payload,
                ) -> ::core::result::Result<Self, ::esframe_core::DecodeErrorKind> {
                    ::esframe_core::__private::unknown_event_type()
                }
            }
        }
    });
    quote! {
        const _: () = {
            #placeholder

            #[automatically_derived]
            impl #impl_generics ::esframe_core::Aggregate for #ident #ty_generics #where_clause {
                const TYPE: &'static ::core::primitive::str = "";

                type Command = #command;
                type Event = #event;
                type Error = #error;
                type Services = #services;

                fn handle(
                    _: &mut ::esframe_core::Decision<'_, Self>,
                    _: &Self::Command,
                    _: &Self::Services,
                ) -> impl ::core::future::Future<
                    Output = ::core::result::Result<(), Self::Error>,
                > + ::core::marker::Send {
                    ::core::future::pending()
                }

                fn apply(&mut self, _: &Self::Event) {
                    #unreachable
                }

                fn to_snapshot(&self) -> ::core::result::Result<#json::Value, #json::Error> {
                    #unreachable
                }

                fn from_snapshot(
                    _: &#json::Value,
                ) -> ::core::result::Result<Self, #json::Error> {
                    #unreachable
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(input: DeriveInput) -> String {
        derive(&input).to_string()
    }

    #[test]
    fn fills_in_defaults() {
        let out = expand(parse_quote! {
            #[aggregate(command = C, event = E)]
            #[aggregate(error = Er)]
            struct r#Account { balance: i64 }
        });
        for expected in [
            r#"const TYPE : & 'static :: core :: primitive :: str = "Account""#,
            "const SNAPSHOT_VERSION : :: core :: primitive :: u32 = 1u32",
            "type Services = ()",
            "Self :: handle (decision , command , services)",
            "Self :: apply (self , event)",
            "impl AddAnInherentFnHandle for r#Account",
        ] {
            assert!(out.contains(expected), "missing {expected} in {out}");
        }
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn reports_all_missing_keys_in_one_error() {
        let out = expand(parse_quote! {
            #[aggregate(name = "account")]
            struct Account;
        });
        assert_eq!(out.matches("compile_error").count(), 1, "{out}");
        assert!(
            out.contains("missing `command`, `event` and `error`"),
            "{out}"
        );
        // The fallback stands in for the missing types.
        assert!(
            out.contains("type Command = MissingInAggregateAttribute"),
            "{out}"
        );
    }

    #[test]
    fn reports_every_mistake_and_still_emits_an_impl() {
        let out = expand(parse_quote! {
            #[aggregate(command = C, event = E, error = Er, snapshot_version = 0, name = "a b")]
            #[aggregate(command = C2, colour = "red")]
            struct Account { balance: i64 }
        });
        assert_eq!(out.matches("compile_error").count(), 4, "{out}");
        assert!(out.contains("type Command = C ;"), "{out}");
    }
}
