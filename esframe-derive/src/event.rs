//! `#[derive(Event)]`: an enum with one variant per event type.

use proc_macro2::TokenStream;
use quote::{ToTokens, quote, quote_spanned};
use syn::{
    Data, DataEnum, DeriveInput, Fields, Generics, Ident, LitStr, Variant, ext::IdentExt,
    parse_quote,
};

use crate::{
    attr::{self, Setting},
    errors::Errors,
    generics,
    upcast::Upcasts,
};

/// Expands `#[derive(Event)]`: the impl, or the errors and a fallback impl.
pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let mut errors = Errors::new();
    let model = EventEnum::from_syn(input, &mut errors);
    errors.expand_or_fallback(model, |model| model.expand(), || fallback(input))
}

/// A validated event enum.
struct EventEnum<'a> {
    ident: &'a Ident,
    generics: &'a Generics,
    variants: Vec<EventVariant<'a>>,
}

/// One variant: one event type.
struct EventVariant<'a> {
    original: &'a Variant,
    /// The stored event type name.
    name: String,
    /// `#[event(name = "...")]` as written, to point errors at it.
    name_lit: Option<LitStr>,
    /// The schema version the code writes.
    version: u32,
    /// `#[event(upcast(...))]`: the upcasters from older versions of this event type.
    upcasts: Upcasts,
}

const ENUM_KEYS: &str = "`version` (`name` and `upcast` are set on each variant)";
const VARIANT_KEYS: &str = "`name`, `version` or `upcast`";

impl<'a> EventEnum<'a> {
    /// Parses and validates the input, recording every mistake in `errors`.
    fn from_syn(input: &'a DeriveInput, errors: &mut Errors) -> Option<Self> {
        let data = match &input.data {
            Data::Enum(data) => Some(data),
            Data::Struct(data) => {
                errors.spanned(
                    data.struct_token,
                    "events are enums: `#[derive(Event)]` expects an enum with one variant per event type",
                );
                None
            }
            Data::Union(data) => {
                errors.spanned(
                    data.union_token,
                    "events are enums: `#[derive(Event)]` expects an enum with one variant per event type",
                );
                None
            }
        };
        generics::reject_lifetimes(
            &input.generics,
            errors,
            "events must own their data: `#[derive(Event)]` does not support lifetime parameters",
        );

        let mut default_version = Setting::default();
        attr::for_each_key(&input.attrs, "event", errors, |errors, meta| {
            if meta.path.is_ident("name") {
                errors.spanned(
                    &meta.path,
                    "`name` is set on each variant, not on the enum: move it to the variant it names",
                );
                attr::skip_value(&meta)
            } else if meta.path.is_ident("upcast") {
                errors.spanned(
                    &meta.path,
                    "`upcast` is set on each variant, not on the enum: upcasters belong to the \
                     variant whose event type they convert",
                );
                attr::skip_value(&meta)
            } else if let Some(key) = attr::key(errors, &meta, "event", &["version"], ENUM_KEYS)? {
                let mut sink = Errors::new();
                let errors = key.errors(errors, &mut sink);
                let value = attr::positive_int(errors, &meta)?;
                default_version.set(errors, "event", &key, value);
                Ok(())
            } else {
                Ok(())
            }
        });
        check_serde_enum_attrs(input, errors);

        let data = data?;
        if data.variants.is_empty() {
            errors.spanned(
                &input.ident,
                format_args!(
                    "`{}` has no variants: an event enum needs one variant per event type",
                    input.ident
                ),
            );
        }
        // `None` when the written version was wrong (already reported).
        let default_version = if default_version.is_present() {
            default_version.value().copied()
        } else {
            Some(1)
        };
        let model = Self {
            ident: &input.ident,
            generics: &input.generics,
            variants: parse_variants(data, default_version, errors),
        };
        model.validate(errors);
        Some(model)
    }

    /// Event type names are unique: a second use is reported on its name, naming the first.
    fn validate(&self, errors: &mut Errors) {
        for (index, variant) in self.variants.iter().enumerate() {
            let first = self.variants[..index]
                .iter()
                .find(|other| other.name == variant.name);
            if let Some(first) = first {
                let name_tokens = match &variant.name_lit {
                    Some(lit) => lit.to_token_stream(),
                    None => variant.original.ident.to_token_stream(),
                };
                errors.spanned(
                    name_tokens,
                    format_args!(
                        "event type name `{}` is already used by variant `{}`",
                        variant.name, first.original.ident
                    ),
                );
            }
        }
    }

    fn expand(&self) -> TokenStream {
        let ident = self.ident;
        let (_, ty_generics, _) = self.generics.split_for_impl();
        // Serde support: for a generic enum a bound in the `where` clause, so that a type
        // argument without serde is reported where the enum is used with it.
        let generics = if self.generics.params.is_empty() {
            self.generics.clone()
        } else {
            generics::with_predicates(
                self.generics,
                [parse_quote! {
                    #ident #ty_generics: ::esframe_core::__private::serde::Serialize
                        + ::esframe_core::__private::serde::de::DeserializeOwned
                        + ::core::marker::Send
                        + ::core::marker::Sync
                        + 'static
                }],
            )
        };
        let (impl_generics, _, where_clause) = generics.split_for_impl();
        // A plain enum's serde functions come from one `const`, spanned on its name: a missing
        // serde derive is one error there, and the impl's bodies need no serde bound.
        let (serde_const, serde) = if self.generics.params.is_empty() {
            let serde_const = quote_spanned! {ident.span()=>
                const __ESFRAME_SERDE: ::esframe_core::__private::EventSerde<#ident> =
                    ::esframe_core::__private::event_serde::<#ident>();
            };
            (Some(serde_const), quote!(__ESFRAME_SERDE))
        } else {
            (
                None,
                quote!(::esframe_core::__private::event_serde::<Self>()),
            )
        };

        let types = self.variants.iter().map(|variant| {
            let name = &variant.name;
            let version = variant.version;
            quote!(::esframe_core::EventType::new(#name, #version))
        });
        let name_arms = self.variants.iter().map(|variant| {
            let pattern = variant.pattern();
            let name = &variant.name;
            quote!(#pattern => #name,)
        });
        let version_arms = self.variants.iter().map(|variant| {
            let pattern = variant.pattern();
            let version = variant.version;
            quote!(#pattern => #version,)
        });
        let decode_arms = self.variants.iter().enumerate().map(|(index, variant)| {
            let name = &variant.name;
            // At most `u32::MAX` variants fit in a serde enum: the index always fits.
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            quote!(#name => (#serde.decode)(#index, payload),)
        });
        let json = quote!(::esframe_core::__private::serde_json);
        // The default `Event::upcasters` (none) unless a variant declares some.
        let upcasters = self
            .variants
            .iter()
            .any(|variant| !variant.upcasts.is_empty())
            .then(|| {
                let upcasters = self
                    .variants
                    .iter()
                    .flat_map(|variant| variant.upcasts.expand(&variant.name));
                quote! {
                    fn upcasters() -> ::std::vec::Vec<
                        ::std::sync::Arc<dyn ::esframe_core::Upcaster>,
                    > {
                        ::std::vec![#(#upcasters),*]
                    }
                }
            });

        quote! {
            const _: () = {
                #serde_const

                #[automatically_derived]
                impl #impl_generics ::esframe_core::Event for #ident #ty_generics #where_clause {
                    fn event_types() -> &'static [::esframe_core::EventType] {
                        const EVENT_TYPES: &[::esframe_core::EventType] = &[#(#types),*];
                        EVENT_TYPES
                    }

                    fn event_type(&self) -> &'static ::core::primitive::str {
                        match self {
                            #(#name_arms)*
                        }
                    }

                    fn schema_version(&self) -> ::core::primitive::u32 {
                        match self {
                            #(#version_arms)*
                        }
                    }

                    fn to_payload(&self) -> ::core::result::Result<#json::Value, #json::Error> {
                        (#serde.encode)(self)
                    }

                    fn from_payload(
                        event_type: &::core::primitive::str,
                        payload: &::esframe_core::Payload,
                    ) -> ::core::result::Result<Self, ::esframe_core::DecodeErrorKind> {
                        match event_type {
                            #(#decode_arms)*
                            _ => ::esframe_core::__private::unknown_event_type(),
                        }
                    }

                    #upcasters
                }
            };
        }
    }
}

impl EventVariant<'_> {
    /// `Self::V { .. }`, `Self::V(..)` or `Self::V`.
    fn pattern(&self) -> TokenStream {
        let ident = &self.original.ident;
        match &self.original.fields {
            Fields::Named(_) => quote!(Self::#ident { .. }),
            Fields::Unnamed(_) => quote!(Self::#ident(..)),
            Fields::Unit => quote!(Self::#ident),
        }
    }
}

fn parse_variants<'a>(
    data: &'a DataEnum,
    default_version: Option<u32>,
    errors: &mut Errors,
) -> Vec<EventVariant<'a>> {
    let mut variants = Vec::new();
    for variant in &data.variants {
        let mut name: Setting<LitStr> = Setting::default();
        let mut version = Setting::default();
        let mut upcasts = Upcasts::default();
        attr::for_each_key(&variant.attrs, "event", errors, |errors, meta| {
            let known = &["name", "version", "upcast"];
            let Some(key) = attr::key(errors, &meta, "event", known, VARIANT_KEYS)? else {
                return Ok(());
            };
            let mut sink = Errors::new();
            let errors = key.errors(errors, &mut sink);
            match key.name {
                "name" => {
                    let value = attr::name(errors, &meta, "AccountOpened")?;
                    name.set(errors, "event", &key, value);
                }
                "version" => {
                    let value = attr::positive_int(errors, &meta)?;
                    version.set(errors, "event", &key, value);
                }
                _ => upcasts.parse(errors, &meta)?, // "upcast"
            }
            Ok(())
        });
        for field in &variant.fields {
            attr::reject_attrs(&field.attrs, "event", errors, "a field");
        }
        check_serde_variant_attrs(variant, errors);

        let name_lit = name.into_value();
        let name = match &name_lit {
            Some(lit) => lit.value(),
            None => variant.ident.unraw().to_string(),
        };
        let version = if version.is_present() {
            version.into_value()
        } else {
            default_version
        };
        // Against a version written wrong, the chain would be checked against a guess.
        if let Some(version) = version {
            upcasts.validate(errors, &name, version);
        }
        variants.push(EventVariant {
            original: variant,
            name,
            name_lit,
            version: version.unwrap_or(1),
            upcasts,
        });
    }
    variants
}

/// Rejects the serde enum representations other than the default externally tagged one: the
/// stored payload is the variant's data alone, the event type name is stored beside it.
fn check_serde_enum_attrs(input: &DeriveInput, errors: &mut Errors) {
    for attr in input
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("serde"))
    {
        // A malformed serde attribute is serde's to report.
        let _ = attr.parse_nested_meta(|meta| {
            for key in ["tag = ...", "content = ...", "untagged"] {
                if meta.path.is_ident(key.trim_end_matches(" = ...")) {
                    errors.spanned(
                        &meta.path,
                        format_args!(
                            "`#[serde({key})]` cannot be used on an event enum: the event type \
                             is stored beside the data, remove it"
                        ),
                    );
                }
            }
            for key in ["from", "try_from", "into"] {
                if meta.path.is_ident(key) {
                    errors.spanned(
                        &meta.path,
                        format_args!(
                            "`#[serde({key} = ...)]` cannot be used on an event enum: events are \
                             stored variant by variant, so serde must see the enum itself; \
                             convert inside the variants' fields instead"
                        ),
                    );
                }
            }
            if meta.path.is_ident("remote") {
                errors.spanned(
                    &meta.path,
                    "`#[serde(remote = ...)]` cannot be used on an event enum: the derive \
                     implements `Event` for this enum, not for the remote type; derive `Event` \
                     on an enum of your own that holds the remote type's data",
                );
            }
            attr::skip_value(&meta)
        });
    }
}

/// Rejects serde variant attributes that change which index serde gives a variant: payloads are
/// decoded by the variant's position in the enum.
fn check_serde_variant_attrs(variant: &Variant, errors: &mut Errors) {
    for attr in variant
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("serde"))
    {
        let _ = attr.parse_nested_meta(|meta| {
            for key in [
                "skip",
                "skip_deserializing",
                "skip_serializing",
                "other",
                "untagged",
            ] {
                if meta.path.is_ident(key) {
                    errors.spanned(
                        &meta.path,
                        format_args!(
                            "`#[serde({key})]` cannot be used on an event variant: payloads are \
                             decoded by variant index, so every variant must serialize and \
                             deserialize as itself"
                        ),
                    );
                }
            }
            attr::skip_value(&meta)
        });
    }
}

/// An impl with the input's generics whose bodies never run: emitted with the errors so that
/// code using the type as an `Event` reports nothing more.
fn fallback(input: &DeriveInput) -> TokenStream {
    let ident = &input.ident;
    let generics = generics::fallback_generics(&input.generics);
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    let json = quote!(::esframe_core::__private::serde_json);
    let unreachable = quote!(::core::panic!("`#[derive(Event)]` failed"));
    quote! {
        const _: () = {
            #[automatically_derived]
            impl #impl_generics ::esframe_core::Event for #ident #ty_generics #where_clause {
                fn event_types() -> &'static [::esframe_core::EventType] {
                    #unreachable
                }
                fn event_type(&self) -> &'static ::core::primitive::str {
                    #unreachable
                }
                fn schema_version(&self) -> ::core::primitive::u32 {
                    #unreachable
                }
                fn to_payload(&self) -> ::core::result::Result<#json::Value, #json::Error> {
                    #unreachable
                }
                fn from_payload(
                    _: &::core::primitive::str,
                    _: &::esframe_core::Payload,
                ) -> ::core::result::Result<Self, ::esframe_core::DecodeErrorKind> {
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
    fn lists_types_and_decodes_by_declaration_index() {
        let out = expand(parse_quote! {
            #[event(version = 2)]
            enum E {
                #[event(name = "Opened", version = 5)]
                A { x: u8 },
                B(u8),
                r#C,
            }
        });
        for expected in [
            r#"EventType :: new ("Opened" , 5u32)"#,
            r#"EventType :: new ("B" , 2u32)"#,
            r#"EventType :: new ("C" , 2u32)"#,
            r#"Self :: A { .. } => "Opened""#,
            r#"Self :: B (..) => "B""#,
            r#"Self :: r#C => "C""#,
            r#""Opened" => (__ESFRAME_SERDE . decode) (0u32 , payload)"#,
            r#""C" => (__ESFRAME_SERDE . decode) (2u32 , payload)"#,
            "# [automatically_derived]",
        ] {
            assert!(out.contains(expected), "missing {expected} in {out}");
        }
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn overrides_upcasters_only_when_a_variant_declares_some() {
        let out = expand(parse_quote! {
            enum E {
                #[event(name = "Deposited", version = 3, upcast(v2 = two, v1 = one))]
                A,
                #[event(version = 2, upcast(v1 = m::b_one))]
                B,
                C,
            }
        });
        assert!(!out.contains("compile_error"), "{out}");
        let upcasters = out
            .split("fn upcasters ()")
            .nth(1)
            .unwrap_or_else(|| panic!("no `upcasters` in {out}"));
        let order: Vec<usize> = [
            r#"upcaster ("Deposited" , 1u32"#,
            r#"upcaster ("Deposited" , 2u32"#,
            r#"upcaster ("B" , 1u32"#,
        ]
        .iter()
        .map(|call| {
            upcasters
                .find(call)
                .unwrap_or_else(|| panic!("no {call} in {out}"))
        })
        .collect();
        assert!(order.is_sorted(), "{out}");

        let out = expand(parse_quote!(
            enum E {
                #[event(version = 2)]
                A,
            }
        ));
        assert!(!out.contains("upcasters"), "{out}");
    }

    #[test]
    fn checks_upcasters_only_against_a_version_written_right() {
        let out = expand(parse_quote! {
            #[event(version = "3")]
            enum E {
                #[event(upcast(v2 = f))]
                A,
                #[event(version = 0, upcast(v1 = f))]
                B,
                #[event(version = 2, upcast(v2 = f))]
                C,
            }
        });
        // The two versions, and `v2` of `C`: nothing about `A` or `B`'s upcasters.
        assert_eq!(out.matches("compile_error").count(), 3, "{out}");
        assert!(out.contains("`C` is at version 2"), "{out}");
    }

    #[test]
    fn bounds_generic_enums_in_the_where_clause() {
        let out = expand(parse_quote!(
            enum E<T> {
                A(T),
            }
        ));
        assert!(
            out.contains("where E < T > : :: esframe_core :: __private :: serde :: Serialize"),
            "{out}"
        );
    }

    #[test]
    fn reports_every_mistake_and_still_emits_an_impl() {
        let out = expand(parse_quote! {
            #[event(version = 0, colour = "red")]
            #[serde(untagged)]
            enum E<'a> {
                #[event(name = "")]
                A(&'a str),
                #[event(name = "B")]
                A2,
                B,
            }
        });
        assert_eq!(out.matches("compile_error").count(), 6, "{out}");
        assert!(
            out.contains("impl < 'a > :: esframe_core :: Event for E < 'a >"),
            "{out}"
        );
    }
}
