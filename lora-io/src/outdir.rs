//! What a command may do to its output: `--out`/`--to` never names or contains one of the
//! command's inputs, and `--force` replaces only what lora-rs wrote there before.
//!
//! Every output directory we create holds a marker, `.lora-rs.json`, saying which command wrote
//! it (and, for commands that write a fixed set of files, which files). `--force` replaces a
//! directory only when it is empty or carries the marker of the same command and holds nothing
//! but that command's files; anything else is refused with the foreign entries named. A single
//! output file (a kohya `.safetensors`) carries the same note in its safetensors metadata.
//!
//! A training run also holds an exclusive lock on its output directory (`.lora-rs.lock`, which
//! keeps the holder's pid) for as long as it writes there, so two runs never interleave.

use crate::error::{io_err, IoError, Result};
use serde_json::{json, Value};
use std::path::{Component, Path, PathBuf};

/// The marker file in every output directory lora-rs creates.
pub const MARKER: &str = ".lora-rs.json";
/// The lock file of a training run's output directory.
pub const LOCK: &str = ".lora-rs.lock";
/// The safetensors metadata key that marks a file lora-rs wrote (its value names the command).
pub const FILE_MARK: &str = "lora_rs_written_by";

fn refuse(path: &Path, reason: impl Into<String>) -> IoError {
    IoError::Output {
        path: path.into(),
        reason: reason.into(),
    }
}

/// `p` made absolute and normalised (`.` and `..` removed lexically), with symlinks resolved
/// in the part that exists; the part that does not exist yet is appended as written.
pub fn resolve(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut norm = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                norm.pop();
            }
            Component::CurDir => {}
            other => norm.push(other),
        }
    }
    let mut existing = norm;
    let mut rest = Vec::new();
    while !existing.exists() {
        match existing.file_name() {
            Some(n) => {
                rest.push(n.to_os_string());
                existing.pop();
            }
            None => break,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for n in rest.iter().rev() {
        out.push(n);
    }
    out
}

/// Refuses an output (`flag` names it: `--out`, `--to`) that is one of the command's inputs or
/// a directory containing one: writing it, and above all replacing it with `--force`, would
/// destroy what the command reads.
pub fn check_not_input(flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let o = resolve(out);
    for (name, input) in inputs {
        let i = resolve(input);
        if i == o {
            return Err(refuse(out, format!("{flag} is the {name}")));
        }
        if i.starts_with(&o) {
            return Err(refuse(
                out,
                format!(
                    "{flag} contains the {name} ({}); an output never replaces an input",
                    input.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The marker a directory carries: the command that wrote it and, when it wrote a fixed set,
/// the files.
fn read_marker(dir: &Path) -> Option<(String, Option<Vec<String>>)> {
    let bytes = crate::files::read_small(&dir.join(MARKER), "marker").ok()??;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    let cmd = v.get("written_by")?.as_str()?.to_string();
    let files = v.get("files").and_then(|f| f.as_array()).map(|a| {
        a.iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect()
    });
    Some((cmd, files))
}

/// Writes the marker into `dir` (atomically): `command` wrote it, and `files` (when given) is
/// everything it wrote.
pub fn write_marker(dir: &Path, command: &str, files: Option<&[String]>) -> Result<()> {
    let mut v = json!({
        "written_by": command,
        "version": env!("CARGO_PKG_VERSION"),
        "note": "written by lora-rs; `--force` replaces this directory only while it holds nothing else",
    });
    if let Some(f) = files {
        v["files"] = json!(f);
    }
    let text = serde_json::to_string_pretty(&v).expect("a JSON value serialises");
    crate::write::write_atomic(&dir.join(MARKER), text.as_bytes())
}

/// Which entries of an existing output directory a command wrote.
pub enum Owned<'a> {
    /// Names matching this test (a training run: adapter, metrics, checkpoints, ...).
    Matching(&'a dyn Fn(&str) -> bool),
    /// The files listed in the marker (merge, combine, convert).
    Listed,
}

/// What an output directory holds now.
#[derive(Debug, PartialEq, Eq)]
pub enum Existing {
    /// Absent, or an empty directory.
    Empty,
    /// A previous output of the same command: these entries, all ours.
    Ours(Vec<PathBuf>),
}

/// Looks at an output directory `command` is about to write (`flag` names it in errors) and
/// says whether it is empty or a previous output of `command` that holds nothing else. A
/// non-directory, a directory without our marker, one written by another command or one with
/// foreign entries is an error naming them: those are never replaced.
pub fn inspect_output(flag: &str, dir: &Path, command: &str, owned: Owned) -> Result<Existing> {
    if !dir.exists() {
        return Ok(Existing::Empty);
    }
    if !dir.is_dir() {
        return Err(refuse(dir, format!("{flag} exists and is not a directory")));
    }
    let mut entries: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().to_string(), e.path()))
        .collect();
    entries.sort();
    if entries.iter().all(|(n, _)| n == LOCK || n == MARKER) {
        // Only our lock or marker (a run that stopped before writing anything): nothing to
        // replace.
        return Ok(Existing::Empty);
    }
    let not_ours = |why: String| {
        refuse(
            dir,
            format!("{flag}: {why}; lora-rs replaces only a directory it wrote and that holds nothing else (choose another {flag} or empty it yourself)"),
        )
    };
    let Some((by, files)) = read_marker(dir) else {
        let shown: Vec<&str> = entries.iter().take(5).map(|(n, _)| n.as_str()).collect();
        return Err(not_ours(format!(
            "not written by lora-rs (no {MARKER}; it holds {}{})",
            shown.join(", "),
            if entries.len() > 5 { ", ..." } else { "" }
        )));
    };
    if by != command {
        return Err(not_ours(format!("written by `{by}`, not `{command}`")));
    }
    // A symlink is never ours: we write files, and following one would write (or delete)
    // someone else's.
    let links: Vec<&str> = entries
        .iter()
        .filter(|(_, p)| p.is_symlink())
        .map(|(n, _)| n.as_str())
        .collect();
    let ours = |name: &str| {
        !links.contains(&name)
            && (name == MARKER
                || name == LOCK
                || match &owned {
                    Owned::Matching(f) => f(name),
                    Owned::Listed => files.as_ref().is_some_and(|l| l.iter().any(|f| f == name)),
                })
    };
    let foreign: Vec<&str> = entries
        .iter()
        .filter(|(n, _)| !ours(n))
        .map(|(n, _)| n.as_str())
        .collect();
    if !foreign.is_empty() {
        return Err(not_ours(format!(
            "holds files lora-rs did not write: {}{}",
            foreign
                .iter()
                .take(5)
                .copied()
                .collect::<Vec<_>>()
                .join(", "),
            if foreign.len() > 5 { ", ..." } else { "" }
        )));
    }
    Ok(Existing::Ours(
        entries.into_iter().map(|(_, p)| p).collect(),
    ))
}

/// The entries of `dir` that `ours` names but that are symlinks (lora-rs never makes one), so a
/// run writing there would write through them into someone else's file.
pub fn symlinked(dir: &Path, ours: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_symlink())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| ours(n) || n == MARKER || n == LOCK)
        .collect();
    v.sort();
    v
}

/// Removes the entries [`inspect_output`] found ours (the marker and the lock stay: they still
/// describe the directory).
pub fn remove_owned(entries: &[PathBuf]) -> Result<()> {
    for p in entries {
        let name = p.file_name().map(|n| n.to_string_lossy().to_string());
        if matches!(name.as_deref(), Some(MARKER) | Some(LOCK)) {
            continue;
        }
        let r = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
        r.map_err(io_err(p))?;
    }
    Ok(())
}

/// Whether the file at `path` is a safetensors file lora-rs wrote (its metadata carries
/// [`FILE_MARK`]); reads the header only.
pub fn file_is_ours(path: &Path) -> bool {
    crate::safetensors::SafetensorsFile::open(path)
        .map(|f| f.metadata.contains_key(FILE_MARK))
        .unwrap_or(false)
}

/// Checks a single output file `flag` names: absent, or (with `force`) a file lora-rs wrote.
pub fn check_output_file(flag: &str, path: &Path, force: bool) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if path.is_dir() {
        return Err(refuse(
            path,
            format!("{flag} is a directory, expected a file"),
        ));
    }
    if !force {
        return Err(refuse(
            path,
            format!("{flag} exists (pass --force to replace a file lora-rs wrote)"),
        ));
    }
    if !file_is_ours(path) {
        return Err(refuse(
            path,
            format!(
                "{flag} exists and was not written by lora-rs (no `{FILE_MARK}` in its metadata); \
                 --force replaces only files lora-rs wrote"
            ),
        ));
    }
    Ok(())
}

/// An exclusive lock on an output directory, held until dropped. The lock file keeps the
/// holder's pid for the message a second run gets.
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Creates `dir` if needed and locks it, or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(LOCK);
        let mut f = open_and_lock(&path, dir)?;
        write_pid(&mut f, &path)?;
        Ok(Self { _file: f })
    }

    /// Says which process holds `dir`'s lock, if one does, without taking it (a run checks
    /// this before it loads anything; it takes the lock when it first writes).
    pub fn check_free(dir: &Path) -> Result<()> {
        let path = dir.join(LOCK);
        let Ok(mut f) = std::fs::OpenOptions::new().read(true).open(&path) else {
            return Ok(());
        };
        lock_or_name_holder(dir, &mut f)?;
        let _ = f.unlock();
        Ok(())
    }
}

/// An exclusive lock on an output that a command replaces as a whole (`lora merge --out`,
/// `lora combine --out`, `lora convert --to`): the lock file `.<name>.lora-rs.lock` sits beside
/// the output and goes when the command ends, so two commands never write the same output.
pub struct OutputLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl OutputLock {
    /// Locks `out` (which need not exist yet), or says which process holds it.
    pub fn beside(out: &Path) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        let name = out
            .file_name()
            .map_or("out".into(), |n| n.to_string_lossy().to_string());
        let path = parent.join(format!(".{name}.lora-rs.lock"));
        let mut f = open_and_lock(&path, out)?;
        // The holder before us removes the file when it ends: a lock on a file no longer at
        // the path locks nothing.
        let same = match (f.metadata(), std::fs::metadata(&path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if !same {
            return Err(refuse(
                out,
                "another process was writing this output as we started; run again",
            ));
        }
        write_pid(&mut f, &path)?;
        Ok(Self { path, _file: f })
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked, so no process can take a lock on this file after us.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Opens the lock file `path` (created if needed) and takes its exclusive lock, or says which
/// process holds `what`.
fn open_and_lock(path: &Path, what: &Path) -> Result<std::fs::File> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err(path))?;
    lock_or_name_holder(what, &mut f)?;
    Ok(f)
}

/// Records our pid in a lock file we hold, for the message a second process gets.
fn write_pid(f: &mut std::fs::File, path: &Path) -> Result<()> {
    use std::io::{Seek, Write};
    f.set_len(0).map_err(io_err(path))?;
    f.rewind().map_err(io_err(path))?;
    write!(f, "{}", std::process::id()).map_err(io_err(path))?;
    f.flush().map_err(io_err(path))
}

fn lock_or_name_holder(dir: &Path, f: &mut std::fs::File) -> Result<()> {
    use std::io::Read;
    match f.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            let who = match s.trim().parse::<u32>() {
                Ok(pid) => format!("process {pid}"),
                Err(_) => "another process".into(),
            };
            Err(refuse(
                dir,
                format!(
                    "{who} is writing this output (it holds the lock); wait for it to finish \
                     or choose another output"
                ),
            ))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(dir.join(LOCK))(e)),
    }
}

/// Removes temporary entries an interrupted run left in `dir` (names `is_stale` accepts) and
/// returns what it removed.
pub fn clean_stale(dir: &Path, is_stale: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(removed);
    };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        if !is_stale(&name) {
            continue;
        }
        let p = e.path();
        let r = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(io_err(&p))?;
        removed.push(p);
    }
    removed.sort();
    Ok(removed)
}

/// Whether process `pid` is alive (Linux: `/proc/<pid>`; elsewhere assumed alive, so nothing of
/// a live process is ever taken for stale).
pub fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Whether `name` has the shape of a temporary [`crate::write::write_atomic`] or a merge
/// writes (`.<file>.tmp-<pid>`, `.<out>.merge-tmp-<pid>[.old]`), whoever's process it was.
pub fn is_temp_name(name: &str) -> bool {
    let name = name.strip_suffix(".old").unwrap_or(name);
    name.starts_with('.')
        && [".tmp-", ".merge-tmp-"].iter().any(|sep| {
            name.rsplit_once(sep)
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// The entries of directory `dir` that `ours` does not accept (a subdirectory is foreign
/// unless `ours` names it), sorted; an unreadable directory counts as foreign.
pub fn foreign_entries(dir: &Path, ours: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![dir.display().to_string()];
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !ours(n))
        .collect();
    v.sort();
    v
}

/// Whether `name` is a temporary that [`crate::write::write_atomic`] (`.<file>.tmp-<pid>`) or a
/// merge (`.<out>.merge-tmp-<pid>`, `....old`) left behind in a process that is gone.
pub fn is_dead_temp(name: &str) -> bool {
    if !name.starts_with('.') {
        return false;
    }
    let name = name.strip_suffix(".old").unwrap_or(name);
    for sep in [".tmp-", ".merge-tmp-"] {
        if let Some((_, pid)) = name.rsplit_once(sep) {
            if let Ok(pid) = pid.parse::<u32>() {
                return pid != std::process::id() && !process_alive(pid);
            }
        }
    }
    false
}

/// Makes `dir` ready for a command that writes the fixed set of `files` there (`lora combine`,
/// `lora convert` to PEFT): never one of `inputs`; absent or empty is fine; an earlier output of
/// the same command is replaced only with `force` (its files are removed now); anything else is
/// refused. The marker listing `files` is written before them, so an interrupted write is still
/// recognised as ours.
pub fn prepare_dir_output(
    flag: &str,
    dir: &Path,
    command: &str,
    files: &[&str],
    force: bool,
    inputs: &[(&str, &Path)],
) -> Result<()> {
    check_not_input(flag, dir, inputs)?;
    match inspect_output(flag, dir, command, Owned::Listed)? {
        Existing::Empty => {}
        Existing::Ours(_) if !force => {
            return Err(refuse(
                dir,
                format!("{flag} exists (pass --force to replace an earlier output of `{command}`)"),
            ))
        }
        Existing::Ours(entries) => remove_owned(&entries)?,
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let files: Vec<String> = files.iter().map(|f| f.to_string()).collect();
    write_marker(dir, command, Some(&files))
}

/// Builds a directory output beside `out` and moves it into place: `build(tmp)` writes the
/// entries into a fresh temporary directory and returns their names (listed in the marker, as
/// `command`'s); then an existing `out` (the caller has checked it may be replaced) is moved
/// aside, the new one renamed in, and the old one deleted, so at every moment `out` is either
/// the old output or the complete new one. On failure the temporary is removed. Temporaries a
/// killed run of the same command left for the same `out` are removed first and returned.
pub fn build_dir_atomically(
    out: &Path,
    command: &str,
    build: impl FnOnce(&Path) -> Result<Vec<String>>,
) -> Result<Vec<PathBuf>> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let out_name = out
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().to_string());
    // A run into the same output that was killed left `.<out>.merge-tmp-<pid>[.old]`.
    let stale_prefix = format!(".{out_name}.merge-tmp-");
    let removed_stale = clean_stale(parent, |n| n.starts_with(&stale_prefix) && is_dead_temp(n))?;
    let tmp = parent.join(format!("{stale_prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let result = (|| -> Result<()> {
        let written = build(&tmp)?;
        write_marker(&tmp, command, Some(&written))?;
        // `.<out>.merge-tmp-<pid>.old`: ours by name, so the stale sweep above finds it too.
        let old = parent.join(format!("{stale_prefix}{}.old", std::process::id()));
        let moved = out.exists();
        if moved {
            std::fs::rename(out, &old).map_err(io_err(out))?;
        }
        std::fs::rename(&tmp, out).map_err(io_err(out))?;
        if moved {
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| removed_stale)
}
