use esframe_core::projection::Projection;

struct Balances;

fn run<P: Projection>(_: P) {}

fn main() {
    run(Balances);
}
