use esframe_core::Command;

#[derive(Command)]
#[command(aggregate_id = "account_id")]
enum AccountCommand {
    Open { account_id: String },
}

#[derive(Command)]
enum Other {
    #[command(aggregate_id = id)]
    Open {
        #[command(aggregate_id = true)]
        id: String,
    },
}

fn main() {}
