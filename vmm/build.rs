//! Compiles the seccomp filters (vmm/seccomp/x86_64.json) to BPF at build time, so the VMM
//! does not parse JSON at start-up. The blob format (read by `seccomp.rs`): per filter, a
//! name length (u8), the name, an instruction count (u32 LE), then each instruction as
//! code (u16 LE), jt (u8), jf (u8), k (u32 LE).

use std::io::Write;

fn main() {
    let src = "seccomp/x86_64.json";
    println!("cargo:rerun-if-changed={src}");
    let json = std::fs::File::open(src).expect("open the seccomp filter file");
    let filters =
        seccompiler::compile_from_json(json, seccompiler::TargetArch::x86_64).expect("compile the seccomp filters");
    let mut names: Vec<_> = filters.keys().cloned().collect();
    names.sort();
    let mut blob = Vec::new();
    for name in names {
        let prog = &filters[&name];
        blob.push(u8::try_from(name.len()).expect("short filter name"));
        blob.extend_from_slice(name.as_bytes());
        blob.extend_from_slice(&u32::try_from(prog.len()).expect("filter length").to_le_bytes());
        for ins in prog {
            blob.extend_from_slice(&ins.code.to_le_bytes());
            blob.push(ins.jt);
            blob.push(ins.jf);
            blob.extend_from_slice(&ins.k.to_le_bytes());
        }
    }
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("seccomp_filters.bin");
    std::fs::File::create(out).and_then(|mut f| f.write_all(&blob)).expect("write the compiled filters");
}
