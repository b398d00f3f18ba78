//! The hypervisor boundary's errors. Each says what went wrong with the offending value, and
//! [`HvError::kind`] tells callers what to do about it: a dead QEMU fails its VM, a retryable
//! failure leaves the VM as it was until the next `ensure`, an input error fails the VM with a
//! reason naming what was wrong.

use std::path::PathBuf;
use std::time::Duration;

use shoal_model::TemplateDiskError;
use thiserror::Error;
use uuid::Uuid;

use crate::qemu::qmp::QmpError;
use crate::TemplateFile;

/// What a caller should do about an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The VM's QEMU is gone or no longer answers (process exited, QMP closed or silent): the
    /// VM has failed.
    Dead,
    /// Might work if tried again (a template source out of reach, transient I/O): the VM keeps
    /// its state and the next `ensure` tries again.
    Retryable,
    /// The request cannot work as given (a bad or corrupt template, an impossible disk size):
    /// trying again changes nothing until the spec or template does.
    Invalid,
    /// The host could not do it (QEMU missing, a tool failed, the guest never became ready).
    Host,
    /// No such VM on this host.
    NotFound,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Dead => "dead",
            ErrorKind::Retryable => "retryable",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Host => "host",
            ErrorKind::NotFound => "not_found",
        }
    }
}

/// Failures of local I/O are worth retrying only when the OS says they are transient.
fn io_kind(e: &std::io::Error) -> ErrorKind {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::Interrupted | K::WouldBlock | K::TimedOut | K::ResourceBusy => ErrorKind::Retryable,
        _ => ErrorKind::Host,
    }
}

#[derive(Debug, Error)]
pub enum HvError {
    #[error("no VM {0} on this host")]
    NotFound(Uuid),
    #[error("hypervisor state in {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A file of a VM or template: `action` says what was being done to `path`.
    #[error("{action} {}: {source}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    // Dead QEMU.
    /// `how` is e.g. `QEMU exited with status 1`; `log` the end of QEMU's own log.
    #[error("{how}{log}")]
    QemuExited { how: String, log: String },
    #[error("{how} before the guest was ready{log}{console}")]
    ExitedBeforeReady { how: String, log: String, console: String },
    /// A QEMU whose QMP accepts but never answers is hung: it gets fenced.
    #[error("QMP stopped answering: {source}")]
    QmpSilent {
        #[source]
        source: QmpError,
    },
    #[error(transparent)]
    Qmp(QmpError),

    // Input errors.
    #[error(transparent)]
    TemplateHash(#[from] TemplateDiskError),
    #[error("the {} of template {template} is corrupt or truncated: its hash is {got}, expected {expected}", file.as_str())]
    CorruptTemplate {
        template: String,
        file: TemplateFile,
        got: String,
        expected: String,
    },
    #[error("disk of {mib} MiB is smaller than template {template}'s {base_mib} MiB")]
    DiskTooSmall { template: String, mib: u64, base_mib: u64 },
    #[error("path {} contains a comma, which QEMU options cannot carry", .0.display())]
    CommaInPath(PathBuf),
    #[error("VM {vm}: the {driver} driver cannot migrate VMs")]
    MigrationUnsupported { vm: Uuid, driver: String },
    #[error("VM {0} has no migration under way on this host")]
    NotMigrating(Uuid),
    /// Only a running VM migrates live; `state` is what it is.
    #[error("VM {vm} is {state}, not running: only a running VM migrates")]
    NotRunning { vm: Uuid, state: String },
    /// The VM already runs here (a second "prepare incoming" for a VM this host has).
    #[error("VM {0} already exists on this host, not as an incoming migration")]
    AlreadyHere(Uuid),
    #[error("VM {vm}: migration failed: {reason}")]
    MigrationFailed { vm: Uuid, reason: String },
    #[error("VM {vm}: the destination has not received the whole VM yet (QEMU is {status})")]
    NotArrived { vm: Uuid, status: String },
    /// A migration endpoint that is not `ADDRESS:PORT`.
    #[error("VM {vm}: migration endpoint {value:?} is not ADDRESS:PORT")]
    BadEndpoint { vm: Uuid, value: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::Ipv4Addr,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {vm}: the {driver} driver keeps no disks to snapshot")]
    NoDisks { vm: Uuid, driver: String },
    #[error("image {manifest}: the {driver} driver keeps no image cache")]
    NoImageCache { manifest: String, driver: String },
    /// Only a running VM's disk is checkpointed; `state` is what it is instead.
    #[error("VM {vm} is {state}: only a running VM's disk is checkpointed")]
    NotCheckpointable { vm: Uuid, state: String },
    /// A checkpoint's `base` that is not the image the VM's overlay sits on: a full checkpoint
    /// laid over it would be another disk than the VM's.
    #[error("VM {vm}: checkpoint base {base} is not the image its disk sits on ({disk_base})")]
    WrongCheckpointBase { vm: Uuid, base: String, disk_base: String },
    /// A VM's disk base that is not `manifest:<hex>`.
    #[error("VM {vm}: disk base {value:?} is not manifest:<64 hex digits>")]
    BadDiskBase { vm: Uuid, value: String },
    /// Another transition, snapshot or checkpoint of the VM is under way: ask again once it is done.
    #[error("VM {vm} is busy ({what}); try again once it is done")]
    Busy { vm: Uuid, what: &'static str },

    // Failures of the host.
    #[error("QEMU binary {} not found (install qemu-system-x86)", .0.display())]
    QemuMissing(PathBuf),
    #[error("QMP socket path {} is too long for a unix socket; use a shorter data dir", .0.display())]
    SocketPathTooLong(PathBuf),
    #[error("QMP socket {} did not appear within {timeout:?}", path.display())]
    NoQmpSocket { path: PathBuf, timeout: Duration },
    #[error("QEMU stayed {state:?}, expected one of {expected:?}")]
    UnexpectedStatus { state: String, expected: Vec<String> },
    #[error("the guest did not report within {timeout:?}: no {waited_for} on its console{console}")]
    NotReady {
        waited_for: String,
        timeout: Duration,
        console: String,
    },
    /// The guest said its configuration failed (cloud-init's errors, or the demo guest's).
    #[error("the guest's configuration failed: {reason}")]
    GuestFailed { reason: String },
    #[error("removed while booting")]
    Removed,
    #[error("saving memory failed: {0}")]
    SaveFailed(String),
    #[error("saving memory took over {0:?}")]
    SaveTimeout(Duration),
    #[error("cannot run {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {stderr}")]
    Tool { what: String, stderr: String },
    #[error("fetching the {} of template {template}: {source}", file.as_str())]
    Fetch {
        template: String,
        file: TemplateFile,
        #[source]
        source: SourceError,
    },
    #[error("virtual network: {0}")]
    Network(#[source] VmNetError),
    /// Storing a snapshot in the image store.
    #[error(transparent)]
    Store(SourceError),
    /// What failed for VM `vm` (a snapshot's steps).
    #[error("VM {vm}: {what}: {source}")]
    Vm {
        vm: String,
        what: &'static str,
        #[source]
        source: Box<HvError>,
    },
}

impl From<QmpError> for HvError {
    fn from(e: QmpError) -> HvError {
        match e {
            QmpError::Timeout { .. } => HvError::QmpSilent { source: e },
            e => HvError::Qmp(e),
        }
    }
}

impl HvError {
    pub fn kind(&self) -> ErrorKind {
        use HvError as E;
        match self {
            E::NotFound(_) | E::NotMigrating(_) => ErrorKind::NotFound,
            E::Busy { .. } => ErrorKind::Retryable,
            E::Io { source, .. } | E::File { source, .. } => io_kind(source),
            E::QemuExited { .. } | E::ExitedBeforeReady { .. } | E::QmpSilent { .. } => ErrorKind::Dead,
            E::Qmp(q) => match q {
                QmpError::Closed { .. } | QmpError::Timeout { .. } => ErrorKind::Dead,
                QmpError::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused => {
                    ErrorKind::Dead
                }
                _ => ErrorKind::Host,
            },
            E::TemplateHash(_)
            | E::CorruptTemplate { .. }
            | E::DiskTooSmall { .. }
            | E::CommaInPath(_)
            | E::NoDisks { .. }
            | E::NoImageCache { .. }
            | E::NotCheckpointable { .. }
            | E::WrongCheckpointBase { .. }
            | E::BadDiskBase { .. }
            | E::MigrationUnsupported { .. }
            | E::NotRunning { .. }
            | E::AlreadyHere(_)
            | E::BadEndpoint { .. }
            | E::GuestFailed { .. } => ErrorKind::Invalid,
            E::QemuMissing(_)
            | E::SocketPathTooLong(_)
            | E::NoQmpSocket { .. }
            | E::UnexpectedStatus { .. }
            | E::NotReady { .. }
            | E::Removed
            | E::SaveFailed(_)
            | E::SaveTimeout(_)
            | E::Spawn { .. }
            | E::Tool { .. }
            | E::MigrationFailed { .. }
            | E::NotArrived { .. }
            | E::Listen { .. } => ErrorKind::Host,
            E::Fetch { source, .. } | E::Store(source) => source.kind(),
            E::Network(n) => n.kind(),
            E::Vm { source, .. } => source.kind(),
        }
    }

    /// The error as a VM's reason: a retryable one says that it will be tried again.
    pub fn reason(&self) -> String {
        if self.is_retryable() {
            format!("{self}; will retry")
        } else {
            self.to_string()
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Retryable
    }

    /// Whether the VM's QEMU is gone or hung.
    pub fn is_dead(&self) -> bool {
        self.kind() == ErrorKind::Dead
    }

    pub(crate) fn file(action: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> HvError {
        let path = path.to_path_buf();
        move |source| HvError::File { action, path, source }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a [`crate::TemplateSource`] could not deliver.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The source did not answer or failed transiently: worth another try.
    #[error("{what}: {source}")]
    Unreachable {
        what: String,
        #[source]
        source: BoxError,
    },
    /// The source does not have it.
    #[error("{what} not found: {reason}")]
    Missing { what: String, reason: String },
    /// The source answered with an error, or what it sent could not be used.
    #[error("{what}: {source}")]
    Failed {
        what: String,
        #[source]
        source: BoxError,
    },
    /// Writing what arrived.
    #[error("writing {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// This source has no image store to get a template's image from.
    #[error("template {template}: image {manifest} is in an image store this host cannot reach")]
    NoImageStore { template: String, manifest: String },
    /// This source has no image store to keep a disk in.
    #[error("no image store to keep {} in", .0.display())]
    NoStore(PathBuf),
}

impl SourceError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SourceError::Unreachable { .. } => ErrorKind::Retryable,
            SourceError::Missing { .. } => ErrorKind::Invalid,
            SourceError::Failed { .. } => ErrorKind::Host,
            SourceError::NoImageStore { .. } | SourceError::NoStore(_) => ErrorKind::Invalid,
            SourceError::Io { source, .. } => io_kind(source),
        }
    }
}

/// Why a [`crate::VmNet`] could not connect a VM.
#[derive(Debug, Error)]
#[error("VM {vm}: {source}")]
pub struct VmNetError {
    pub vm: String,
    /// Whether the network driver expects a later attempt to work.
    pub retryable: bool,
    #[source]
    pub source: BoxError,
}

impl VmNetError {
    pub fn kind(&self) -> ErrorKind {
        if self.retryable {
            ErrorKind::Retryable
        } else {
            ErrorKind::Host
        }
    }
}

/// Why [`crate::SimLoad`] could not read a trace directory.
#[derive(Debug, Error)]
pub enum SimLoadError {
    #[error("trace directory {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} line {line}: {value:?} is not a CPU percentage", path.display())]
    Sample { path: PathBuf, line: usize, value: String },
    #[error("trace directory {} holds no traces", .0.display())]
    Empty(PathBuf),
    #[error("a trace step must be longer than 0 s")]
    ZeroStep,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: std::io::ErrorKind) -> std::io::Error {
        std::io::Error::new(kind, "x")
    }

    #[test]
    fn kinds_tell_dead_from_retryable_from_bad_input() {
        let path = PathBuf::from("/run/qmp.sock");
        let silent = HvError::from(QmpError::Timeout {
            path: path.clone(),
            what: "stop".into(),
            timeout: Duration::from_secs(3),
        });
        assert_eq!(silent.kind(), ErrorKind::Dead);
        assert!(silent.to_string().starts_with("QMP stopped answering: "), "{silent}");
        let closed = HvError::from(QmpError::Closed {
            path: path.clone(),
            what: "cont".into(),
        });
        assert!(closed.is_dead() && !closed.is_retryable());
        let refused = HvError::from(QmpError::Command {
            command: "cont".into(),
            class: "GenericError".into(),
            desc: "no".into(),
        });
        assert_eq!(refused.kind(), ErrorKind::Host);

        let unreachable = HvError::Fetch {
            template: "demo".into(),
            file: TemplateFile::Kernel,
            source: SourceError::Unreachable {
                what: "http://ctl:7000".into(),
                source: "connection refused".into(),
            },
        };
        assert!(unreachable.is_retryable());
        assert_eq!(
            unreachable.to_string(),
            "fetching the kernel of template demo: http://ctl:7000: connection refused"
        );
        let missing = SourceError::Missing {
            what: "template demo".into(),
            reason: "deleted".into(),
        };
        assert_eq!(missing.kind(), ErrorKind::Invalid);

        let bad = HvError::from(shoal_model::TemplateDisk::parse("sha1:00").unwrap_err());
        assert_eq!(bad.kind(), ErrorKind::Invalid);
        assert!(bad.to_string().contains("\"sha1:00\""), "{bad}");

        let transient = HvError::file("storing", &path)(io(std::io::ErrorKind::Interrupted));
        assert!(transient.is_retryable());
        let full = HvError::file("storing", &path)(std::io::Error::from_raw_os_error(28));
        assert_eq!(full.kind(), ErrorKind::Host);
        assert!(full.to_string().contains("No space left on device"), "{full}");

        let wrapped = HvError::Vm {
            vm: "a-0".into(),
            what: "pausing for the snapshot",
            source: Box::new(silent),
        };
        assert_eq!(wrapped.kind(), ErrorKind::Dead, "a wrapped error keeps its kind");
        let net = HvError::Network(VmNetError {
            vm: "a-0".into(),
            retryable: true,
            source: "tap busy".into(),
        });
        assert_eq!(net.kind(), ErrorKind::Retryable);
        assert_eq!(HvError::NotFound(Uuid::nil()).kind(), ErrorKind::NotFound);
    }
}
