fn main() {
    eprintln!("dtrain: not built yet");
    std::process::exit(2);
}
