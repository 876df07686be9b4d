use esframe_core::{GlobalLog, SnapshotStore};

fn with_snapshots<S: SnapshotStore>(_: &S) {}

fn with_a_log<S: GlobalLog>(_: &S) {}

fn main() {
    let store = std::collections::HashMap::<String, String>::new();
    with_snapshots(&store);
    with_a_log(&store);
}
