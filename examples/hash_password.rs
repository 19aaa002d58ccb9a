//! Prints an argon2id PHC string for a softphone agent's `password_hash`:
//! `cargo run --example hash_password -- 'the password'`.
use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};

fn main() {
    let Some(pw) = std::env::args().nth(1) else {
        eprintln!("usage: cargo run --example hash_password -- PASSWORD");
        std::process::exit(2);
    };
    let salt = SaltString::generate(&mut OsRng);
    match argon2::Argon2::default().hash_password(pw.as_bytes(), &salt) {
        Ok(h) => println!("{h}"),
        Err(e) => {
            eprintln!("cannot hash: {e}");
            std::process::exit(1);
        }
    }
}
