//! `#[derive(Command)]`: a struct or an enum with a field that names the target aggregate.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::{
    Data, DataEnum, DeriveInput, Expr, ExprLit, ExprPath, Field, Fields, Generics, Ident, Index,
    Lit, Member, Type, WherePredicate, ext::IdentExt, meta::ParseNestedMeta, parse_quote,
    spanned::Spanned,
};

use crate::{
    attr::{self, Setting},
    errors::{Errors, closest},
    generics,
};

/// Expands `#[derive(Command)]`: the impl, or the errors and a fallback impl.
pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let mut errors = Errors::new();
    let model = CommandInput::from_syn(input, &mut errors);
    errors.expand_or_fallback(model, |model| model.expand(), || fallback(input))
}

/// A validated command type.
struct CommandInput<'a> {
    ident: &'a Ident,
    generics: &'a Generics,
    /// One for a struct, one per variant for an enum.
    targets: Vec<Target<'a>>,
}

/// A struct, or one variant of an enum, with the fields the impl reads.
struct Target<'a> {
    /// The variant, or `None` for a struct.
    variant: Option<&'a Ident>,
    aggregate_id: MarkedField<'a>,
    command_id: Option<MarkedField<'a>>,
}

/// A field the impl reads, by member (`name` or `0`) with its type for bounds and spans.
struct MarkedField<'a> {
    member: Member,
    ty: &'a Type,
}

/// A field as written: its member, for messages and patterns.
fn member_of(index: usize, field: &Field) -> Member {
    match &field.ident {
        Some(ident) => Member::Named(ident.clone()),
        None => Member::Unnamed(Index {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            span: field.span(),
        }),
    }
}

fn member_to_string(member: &Member) -> String {
    match member {
        Member::Named(ident) => ident.unraw().to_string(),
        Member::Unnamed(index) => index.index.to_string(),
    }
}

/// Which of the two markers a key is.
#[derive(Clone, Copy, PartialEq)]
enum Marker {
    AggregateId,
    CommandId,
}

/// The keys of `#[command(...)]`, as [`Marker::key`] spells them.
const MARKER_KEYS: &[&str] = &["aggregate_id", "command_id"];

impl Marker {
    /// The marker of a key of [`MARKER_KEYS`].
    fn from_key(key: &str) -> Self {
        if key == "aggregate_id" {
            Self::AggregateId
        } else {
            Self::CommandId
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::AggregateId => "aggregate_id",
            Self::CommandId => "command_id",
        }
    }

    /// What the marked field holds, for messages.
    fn holds(self) -> &'static str {
        match self {
            Self::AggregateId => "the id of the target aggregate",
            Self::CommandId => "the command's id",
        }
    }
}

/// `aggregate_id = field` / `command_id = field` on an enum: the field of every variant.
#[derive(Default)]
struct EnumLevel {
    aggregate_id: Setting<Member>,
    command_id: Setting<Member>,
}

impl EnumLevel {
    fn get(&self, marker: Marker) -> &Setting<Member> {
        match marker {
            Marker::AggregateId => &self.aggregate_id,
            Marker::CommandId => &self.command_id,
        }
    }

    fn get_mut(&mut self, marker: Marker) -> &mut Setting<Member> {
        match marker {
            Marker::AggregateId => &mut self.aggregate_id,
            Marker::CommandId => &mut self.command_id,
        }
    }
}

impl<'a> CommandInput<'a> {
    /// Parses and validates the input, recording every mistake in `errors`.
    fn from_syn(input: &'a DeriveInput, errors: &mut Errors) -> Option<Self> {
        generics::reject_lifetimes(
            &input.generics,
            errors,
            "commands must own their data: `#[derive(Command)]` does not support lifetime parameters",
        );
        let is_enum = matches!(input.data, Data::Enum(_));
        let mut enum_level = EnumLevel::default();
        attr::for_each_key(&input.attrs, "command", errors, |errors, meta| {
            if !is_enum {
                return struct_level_key(errors, &meta, &mut enum_level);
            }
            let expected = "`aggregate_id = field` or `command_id = field`";
            let Some(key) = attr::key(errors, &meta, "command", MARKER_KEYS, expected)? else {
                return Ok(());
            };
            let mut sink = Errors::new();
            let errors = key.errors(errors, &mut sink);
            let value = field_name(errors, &meta)?;
            enum_level
                .get_mut(Marker::from_key(key.name))
                .set(errors, "command", &key, value);
            attr::skip_value(&meta)
        });
        if let Data::Enum(data) = &input.data {
            check_enum_level_fields(&input.ident, data, &mut enum_level, errors);
        }

        let targets = match &input.data {
            Data::Struct(data) => {
                let target = parse_target(&input.ident, None, &data.fields, &enum_level, errors);
                vec![target?]
            }
            Data::Enum(data) => {
                if data.variants.is_empty() {
                    errors.spanned(
                        &input.ident,
                        format_args!(
                            "`{}` has no variants: a command enum needs at least one",
                            input.ident
                        ),
                    );
                }
                let mut targets = Vec::new();
                for variant in &data.variants {
                    attr::reject_attrs(
                        &variant.attrs,
                        "command",
                        errors,
                        "a variant: mark a field with `#[command(aggregate_id)]`, or name the \
                         field of every variant with `#[command(aggregate_id = field)]` on the enum",
                    );
                    let target = parse_target(
                        &variant.ident,
                        Some(&variant.ident),
                        &variant.fields,
                        &enum_level,
                        errors,
                    );
                    targets.extend(target);
                }
                targets
            }
            Data::Union(data) => {
                errors.spanned(
                    data.union_token,
                    "`#[derive(Command)]` supports structs and enums, not unions",
                );
                return None;
            }
        };
        Some(Self {
            ident: &input.ident,
            generics: &input.generics,
            targets,
        })
    }

    fn expand(&self) -> TokenStream {
        let ident = self.ident;
        let has_params = !self.generics.params.is_empty();
        let mut predicates: Vec<WherePredicate> = Vec::new();
        if has_params {
            predicates.push(parse_quote! {
                Self: ::core::marker::Send + ::core::marker::Sync + 'static
            });
        }
        let aggregate_id_arms = self.targets.iter().map(|target| {
            let field = &target.aggregate_id;
            let ty = field.ty;
            if generics::mentions_params(ty, self.generics) {
                predicates.push(parse_quote!(#ty: ::core::fmt::Display));
            }
            let pattern = target.pattern(&field.member, quote!(__aggregate_id));
            // Spanned on the field's type: "doesn't implement `Display`" lands on the field.
            let to_string = quote_spanned! {ty.span()=>
                ::esframe_core::__private::assert_display(__aggregate_id);
                ::std::string::ToString::to_string(__aggregate_id)
            };
            quote!(#pattern => { #to_string })
        });
        let aggregate_id_arms: Vec<TokenStream> = aggregate_id_arms.collect();

        let uuid = quote!(::esframe_core::__private::Uuid);
        let (command_id_trait, command_id): (Option<TokenStream>, Option<TokenStream>) = self
            .targets
            .iter()
            .any(|target| target.command_id.is_some())
            .then(|| {
                let arms = self.targets.iter().filter_map(|target| {
                    let field = target.command_id.as_ref()?;
                    let ty = field.ty;
                    if generics::mentions_params(ty, self.generics) {
                        predicates.push(parse_quote!(#ty: CommandIdField));
                    }
                    let pattern = target.pattern(&field.member, quote!(__command_id));
                    // Spanned on the field's type: a wrong type is reported on the field.
                    let into = quote_spanned! {ty.span()=>
                        CommandIdField::command_id(__command_id)
                    };
                    Some(quote!(#pattern => #into,))
                });
                let arms: Vec<TokenStream> = arms.collect();
                let rest = self
                    .targets
                    .iter()
                    .any(|target| target.command_id.is_none())
                    .then(|| quote!(_ => ::core::option::Option::None,));
                let method = quote! {
                    fn command_id(&self) -> ::core::option::Option<#uuid> {
                        match self {
                            #(#arms)*
                            #rest
                        }
                    }
                };
                (command_id_field_trait(), method)
            })
            .unzip();

        let generics = generics::with_predicates(self.generics, predicates);
        let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
        quote! {
            const _: () = {
                #command_id_trait

                #[automatically_derived]
                impl #impl_generics ::esframe_core::Command for #ident #ty_generics #where_clause {
                    fn aggregate_id(&self) -> ::std::string::String {
                        match self {
                            #(#aggregate_id_arms)*
                        }
                    }

                    #command_id
                }
            };
        }
    }
}

/// The types a `#[command(command_id)]` field may have, with a message for any other type.
fn command_id_field_trait() -> TokenStream {
    let uuid = quote!(::esframe_core::__private::Uuid);
    quote! {
        #[diagnostic::on_unimplemented(
            message = "a `#[command(command_id)]` field must be a `Uuid` or an `Option<Uuid>`, not `{Self}`",
            label = "expected `Uuid` or `Option<Uuid>`"
        )]
        trait CommandIdField {
            fn command_id(&self) -> ::core::option::Option<#uuid>;
        }

        impl CommandIdField for #uuid {
            fn command_id(&self) -> ::core::option::Option<#uuid> {
                ::core::option::Option::Some(*self)
            }
        }

        impl CommandIdField for ::core::option::Option<#uuid> {
            fn command_id(&self) -> ::core::option::Option<#uuid> {
                *self
            }
        }
    }
}

impl Target<'_> {
    /// `Self { member: binding, .. }` or `Self::Variant { member: binding, .. }`: one pattern
    /// for named and tuple fields (`Self::V { 0: binding, .. }`).
    fn pattern(&self, member: &Member, binding: TokenStream) -> TokenStream {
        match self.variant {
            Some(variant) => quote!(Self::#variant { #member: #binding, .. }),
            None => quote!(Self { #member: #binding, .. }),
        }
    }
}

/// A key of `#[command(...)]` on a struct, where no key belongs: reported, with what to write
/// instead. A marker, or a key close to one, counts as that marker written on the type, so that
/// the struct is not also reported as having no marked field.
fn struct_level_key(
    errors: &mut Errors,
    meta: &ParseNestedMeta<'_>,
    enum_level: &mut EnumLevel,
) -> syn::Result<()> {
    let written = attr::path_to_string(&meta.path);
    let exact = MARKER_KEYS.iter().find(|key| meta.path.is_ident(key));
    if let Some(name) = exact {
        errors.spanned(
            &meta.path,
            format_args!(
                "`#[command({name} = ...)]` on the type is for enums: on a struct, mark the \
                 field with `#[command({name})]`"
            ),
        );
    } else {
        let expected = "none on a struct: mark its fields with `#[command(aggregate_id)]` or \
                        `#[command(command_id)]`";
        attr::unknown_key(errors, meta, "command", expected)?;
    }
    let (marker, guessed) = match exact {
        Some(name) => (Some(*name), false),
        None => (closest(&written, MARKER_KEYS.iter().copied()), true),
    };
    if let Some(name) = marker {
        let key = attr::Key {
            name,
            path: meta.path.clone(),
            guessed,
        };
        enum_level
            .get_mut(Marker::from_key(name))
            .set(errors, "command", &key, None);
    }
    attr::skip_value(meta)
}

/// A field that `#[command(key = field)]` on the enum names but no variant has is a mistake in
/// that name: reported once, on it, with the field it is closest to, rather than on every
/// variant. The key still counts as written.
fn check_enum_level_fields(
    ident: &Ident,
    data: &DataEnum,
    enum_level: &mut EnumLevel,
    errors: &mut Errors,
) {
    if data.variants.is_empty() {
        return;
    }
    for marker in [Marker::AggregateId, Marker::CommandId] {
        let setting = enum_level.get_mut(marker);
        let Some(wanted) = setting.value() else {
            continue;
        };
        let wanted_name = member_to_string(wanted);
        let fields = data.variants.iter().flat_map(|variant| {
            variant
                .fields
                .iter()
                .enumerate()
                .map(|(index, field)| member_to_string(&member_of(index, field)))
        });
        let fields: Vec<String> = fields.collect();
        if fields.contains(&wanted_name) {
            continue;
        }
        let suggestion = match wanted {
            Member::Named(_) => closest(&wanted_name, fields.iter().map(String::as_str)),
            Member::Unnamed(_) => None,
        };
        let message = match suggestion {
            Some(field) => format!(
                "no variant of `{ident}` has a field `{wanted_name}`; did you mean `{field}`?"
            ),
            None => format!(
                "no variant of `{ident}` has a field `{wanted_name}`: name the field of every \
                 variant that holds {}",
                marker.holds()
            ),
        };
        errors.spanned(wanted, message);
        setting.discard_value();
    }
}

/// Reads the field a key on the enum names: `aggregate_id = account_id` or `= 0`.
fn field_name(errors: &mut Errors, meta: &ParseNestedMeta<'_>) -> syn::Result<Option<Member>> {
    let expr: Expr = meta.value()?.parse()?;
    match &expr {
        Expr::Path(ExprPath {
            path, qself: None, ..
        }) if path.get_ident().is_some() => {
            Ok(path.get_ident().map(|ident| Member::Named(ident.clone())))
        }
        Expr::Lit(ExprLit {
            lit: Lit::Int(int), ..
        }) if int.suffix().is_empty() => match int.base10_parse::<u32>() {
            Ok(index) => Ok(Some(Member::Unnamed(Index {
                index,
                span: int.span(),
            }))),
            Err(error) => Err(error),
        },
        _ => {
            let key = attr::path_to_string(&meta.path);
            errors.spanned(
                &expr,
                format_args!(
                    "`{key}` must name a field of every variant, e.g. `{key} = account_id` or \
                     `{key} = 0`"
                ),
            );
            Ok(None)
        }
    }
}

/// Reads the field markers of one struct or variant and finds its `aggregate_id` and
/// `command_id` fields. `name` is the struct's or variant's ident, where a missing field is
/// reported.
fn parse_target<'a>(
    name: &'a Ident,
    variant: Option<&'a Ident>,
    fields: &'a Fields,
    enum_level: &EnumLevel,
    errors: &mut Errors,
) -> Option<Target<'a>> {
    // With whether the field was marked with a misspelled key (already reported).
    let mut marked: [Option<(MarkedField<'a>, bool)>; 2] = [None, None];
    for (index, field) in fields.iter().enumerate() {
        let member = member_of(index, field);
        attr::for_each_key(&field.attrs, "command", errors, |errors, meta| {
            let expected = "`aggregate_id` or `command_id`";
            let Some(key) = attr::key(errors, &meta, "command", MARKER_KEYS, expected)? else {
                return Ok(());
            };
            let mut sink = Errors::new();
            let errors = key.errors(errors, &mut sink);
            attr::reject_value(errors, &meta)?;
            let marker = Marker::from_key(key.name);
            let name = key.name;
            let slot = &mut marked[marker as usize];
            if let Some(on_enum) = enum_level.get(marker).value() {
                let on_enum = member_to_string(on_enum);
                errors.spanned(
                    &meta.path,
                    format_args!(
                        "`{name}` is already set for every variant by \
                         `#[command({name} = {on_enum})]` on the enum: remove one of them"
                    ),
                );
            } else {
                match slot {
                    Some((first, false)) if !key.guessed => errors.spanned(
                        &meta.path,
                        format_args!(
                            "`#[command({name})]` is already on field `{}`: mark only one field",
                            member_to_string(&first.member)
                        ),
                    ),
                    // A misspelled marker never displaces a marked field; a marker spelled
                    // right displaces a misspelled one.
                    Some(_) if key.guessed => {}
                    _ => {
                        let field = MarkedField {
                            member: member.clone(),
                            ty: &field.ty,
                        };
                        *slot = Some((field, key.guessed));
                    }
                }
            }
            Ok(())
        });
    }
    let mut marked = marked.map(|slot| slot.map(|(field, _)| field));

    // Fields named on the enum.
    for marker in [Marker::AggregateId, Marker::CommandId] {
        let Some(wanted) = enum_level.get(marker).value() else {
            continue;
        };
        let found = fields.iter().enumerate().find_map(|(index, field)| {
            let member = member_of(index, field);
            (member_to_string(&member) == member_to_string(wanted)).then_some(MarkedField {
                member,
                ty: &field.ty,
            })
        });
        if found.is_none() {
            let key = marker.key();
            let wanted = member_to_string(wanted);
            let names: Vec<String> = fields
                .iter()
                .filter_map(|field| field.ident.as_ref().map(|ident| ident.unraw().to_string()))
                .collect();
            let suggestion = closest(&wanted, names.iter().map(String::as_str))
                .map(|field| format!("; did you mean `{field}`?"))
                .unwrap_or_default();
            errors.spanned(
                name,
                format_args!(
                    "variant `{name}` has no field `{wanted}`, which \
                     `#[command({key} = {wanted})]` on the enum names{suggestion}"
                ),
            );
        }
        marked[marker as usize] = found;
    }

    let [aggregate_id, command_id] = marked;
    if aggregate_id.is_none() && !enum_level.aggregate_id.is_present() {
        let message = match (variant, fields) {
            (None, Fields::Unit) => format!(
                "`{name}` is a unit struct: it has no field to name the target aggregate, add \
                 one and mark it with `#[command(aggregate_id)]`"
            ),
            (Some(_), Fields::Unit) => format!(
                "variant `{name}` has no field to name the target aggregate: add one and mark it \
                 with `#[command(aggregate_id)]`"
            ),
            (None, _) => format!(
                "no field of `{name}` is marked `#[command(aggregate_id)]`: mark the field that \
                 holds the id of the target aggregate"
            ),
            (Some(_), _) => format!(
                "no field of variant `{name}` is marked `#[command(aggregate_id)]`: mark the \
                 field that holds the id of the target aggregate, or name it for every variant \
                 with `#[command(aggregate_id = field)]` on the enum"
            ),
        };
        errors.spanned(name, message);
    }
    Some(Target {
        variant,
        aggregate_id: aggregate_id?,
        command_id,
    })
}

/// An impl whose bodies never run, emitted with the errors so that code using the type as a
/// `Command` reports nothing more.
fn fallback(input: &DeriveInput) -> TokenStream {
    let ident = &input.ident;
    let generics = generics::fallback_generics(&input.generics);
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    quote! {
        const _: () = {
            #[automatically_derived]
            impl #impl_generics ::esframe_core::Command for #ident #ty_generics #where_clause {
                fn aggregate_id(&self) -> ::std::string::String {
                    ::core::panic!("`#[derive(Command)]` failed")
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
    fn binds_named_and_positional_fields() {
        let out = expand(parse_quote! {
            enum C {
                A { #[command(aggregate_id)] id: u8, #[command(command_id)] request: Uuid },
                B(u8, #[command(aggregate_id)] String),
            }
        });
        for expected in [
            "Self :: A { id : __aggregate_id , .. } =>",
            "Self :: B { 1 : __aggregate_id , .. } =>",
            "Self :: A { request : __command_id , .. } => CommandIdField :: command_id (__command_id) ,",
            "_ => :: core :: option :: Option :: None",
        ] {
            assert!(out.contains(expected), "missing {expected} in {out}");
        }
    }

    #[test]
    fn no_catch_all_arm_when_every_variant_has_a_command_id() {
        let out = expand(parse_quote! {
            #[command(aggregate_id = 0, command_id = 1)]
            enum C { A(u8, Uuid), B(u8, Option<Uuid>) }
        });
        assert!(out.contains("Self :: B { 1 : __command_id , .. }"), "{out}");
        assert!(!out.contains("_ =>"), "{out}");
        // No `command_id` field, no `command_id` method: the trait's default returns `None`.
        let out = expand(parse_quote!(
            struct D {
                #[command(aggregate_id)]
                id: u8,
            }
        ));
        assert!(!out.contains("fn command_id"), "{out}");
    }

    #[test]
    fn bounds_only_field_types_that_mention_parameters() {
        let out = expand(parse_quote! {
            struct C<Id> { #[command(aggregate_id)] id: Id, #[command(command_id)] request: Uuid }
        });
        assert!(out.contains("Id : :: core :: fmt :: Display"), "{out}");
        assert!(!out.contains("Uuid : CommandIdField"), "{out}");
    }

    #[test]
    fn a_field_no_variant_has_is_one_error_on_its_name() {
        let out = expand(parse_quote! {
            #[command(aggregate_id = card_id)]
            enum C { A { cart_id: u8 }, B { cart_id: u8, item: u8 }, C }
        });
        assert_eq!(out.matches("compile_error").count(), 1, "{out}");
        assert!(out.contains("did you mean `cart_id`?"), "{out}");
        // A field some variants have is reported on each variant without it.
        let out = expand(parse_quote! {
            #[command(aggregate_id = cart_id)]
            enum C { A { cart_id: u8 }, B { card_id: u8 }, C }
        });
        assert_eq!(out.matches("compile_error").count(), 2, "{out}");
        assert!(out.contains("names; did you mean `card_id`?"), "{out}");
    }

    #[test]
    fn reports_every_mistake_and_still_emits_an_impl() {
        let out = expand(parse_quote! {
            #[command(aggregate_id = id, colour)]
            enum C {
                A { id: u8 },
                B { #[command(aggregate_id)] id: u8 },
                C,
            }
        });
        assert_eq!(out.matches("compile_error").count(), 3, "{out}");
        assert!(out.contains(":: esframe_core :: Command for C"), "{out}");
    }
}
