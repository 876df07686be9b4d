//! Every shape `#[derive(Command)]` accepts, and the ids it extracts.

use esframe_core::Command;
use uuid::Uuid;

#[derive(Command)]
struct Deposit {
    #[command(aggregate_id)]
    account_id: String,
    #[allow(dead_code)]
    amount: u64,
}

#[derive(Command)]
struct Tagged(#[command(aggregate_id)] Uuid, #[command(command_id)] Uuid);

#[derive(Command)]
struct MaybeTagged {
    #[command(aggregate_id, command_id)]
    id: Uuid,
}

#[derive(Command)]
struct Optional {
    #[command(aggregate_id)]
    r#ref: u64,
    #[command(command_id)]
    request: Option<Uuid>,
}

#[allow(dead_code)]
#[derive(Command)]
#[command(aggregate_id = account_id)]
enum AccountCommand {
    Open { account_id: String, owner: String },
    Deposit { account_id: String, amount: u64 },
}

#[allow(dead_code)]
#[derive(Command)]
#[command(aggregate_id = 0, command_id = 1)]
enum Positional {
    A(u32, Uuid),
    B(u64, Option<Uuid>, String),
}

#[allow(dead_code)]
#[derive(Command)]
enum Other {
    A {
        #[command(aggregate_id)]
        id: u64,
        #[command(command_id)]
        request: Uuid,
    },
    B(#[command(aggregate_id)] String, u32),
    C {
        #[command(command_id)]
        request: Option<Uuid>,
        #[command(aggregate_id)]
        id: char,
    },
}

fn main() {
    let id = Uuid::from_u128(7);
    let request = Uuid::from_u128(9);

    let deposit = Deposit {
        account_id: "acc-1".into(),
        amount: 5,
    };
    assert_eq!(deposit.aggregate_id(), "acc-1");
    assert_eq!(deposit.command_id(), None);

    let tagged = Tagged(id, request);
    assert_eq!(tagged.aggregate_id(), id.to_string());
    assert_eq!(tagged.command_id(), Some(request));
    assert_eq!(MaybeTagged { id }.command_id(), Some(id));

    let optional = Optional {
        r#ref: 3,
        request: Some(request),
    };
    assert_eq!(
        (optional.aggregate_id(), optional.command_id()),
        ("3".into(), Some(request))
    );
    assert_eq!(
        Optional {
            r#ref: 3,
            request: None
        }
        .command_id(),
        None
    );

    let open = AccountCommand::Open {
        account_id: "a".into(),
        owner: "ada".into(),
    };
    let deposit = AccountCommand::Deposit {
        account_id: "b".into(),
        amount: 1,
    };
    assert_eq!(
        (open.aggregate_id(), deposit.aggregate_id()),
        ("a".into(), "b".into())
    );
    assert_eq!(open.command_id(), None);

    assert_eq!(Positional::A(1, request).aggregate_id(), "1");
    assert_eq!(Positional::A(1, request).command_id(), Some(request));
    assert_eq!(Positional::B(2, None, String::new()).command_id(), None);

    let a = Other::A { id: 4, request };
    assert_eq!(
        (a.aggregate_id(), a.command_id()),
        ("4".into(), Some(request))
    );
    let b = Other::B("bee".into(), 0);
    assert_eq!((b.aggregate_id(), b.command_id()), ("bee".into(), None));
    let c = Other::C {
        request: None,
        id: 'c',
    };
    assert_eq!((c.aggregate_id(), c.command_id()), ("c".into(), None));
}
