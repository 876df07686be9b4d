// The enum names a field no variant has: one error, on the name, with the field it is closest
// to, rather than one per variant.
use esframe_core::Command;

#[derive(Command)]
#[command(aggregate_id = card_id)]
enum CartCommand {
    Add { cart_id: String, item: String },
    Remove { cart_id: String, item: String },
    Clear { cart_id: String },
}

fn main() {
    let _ = CartCommand::Clear { cart_id: "c".into() }.aggregate_id();
}
