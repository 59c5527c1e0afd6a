//! Mooncake's master RPCs as its 0.3.13 release puts them on the wire: the types (fields in
//! C++ declaration order), and each function's id, arguments and reply.

use super::struct_pack::{packed_struct, DecodeError, Pack, Reader, Writer};

/// What `ServiceReady` answers and Mooncake's client requires, exactly.
pub const SERVICE_VERSION: &str = "2.0.0";

/// The Mooncake release whose types this wire speaks: clients of other releases send other
/// type hashes.
pub const WIRE_RELEASE: &str = "Mooncake 0.3.13";

/// Mooncake's `UUID`, a `std::pair<uint64_t, uint64_t>`: a trivially copyable struct, whose
/// literal carries its packing and alignment (8, 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Uuid {
    /// `first`.
    pub first: u64,
    /// `second`.
    pub second: u64,
}

impl Uuid {
    /// As one 128-bit id: `first` is the high half.
    pub fn to_u128(self) -> u128 {
        u128::from(self.first) << 64 | u128::from(self.second)
    }

    /// From one 128-bit id.
    pub fn from_u128(id: u128) -> Self {
        Self {
            first: (id >> 64) as u64,
            second: id as u64,
        }
    }
}

impl Pack for Uuid {
    fn literal(out: &mut Vec<u8>) {
        // Members, then pack and alignment as size literals (8 -> 0x89).
        out.extend_from_slice(&[0xfd, 0x04, 0x04, 0x89, 0x89, 0xff]);
    }
    fn write(&self, w: &mut Writer) {
        self.first.write(w);
        self.second.write(w);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            first: u64::read(r)?,
            second: u64::read(r)?,
        })
    }
}

packed_struct! {
    /// A segment a client mounts.
    pub struct Segment {
        /// Per-mount id.
        pub id: Uuid,
        /// The client's name (`local_hostname:port`).
        pub name: String,
        /// Address of its first byte in the owner's memory.
        pub base: u64,
        /// Bytes.
        pub size: u64,
        /// The owner's Transfer Engine endpoint.
        pub te_endpoint: String,
        /// Transport, e.g. `tcp`.
        pub protocol: String,
        /// The owner's host.
        pub host_id: String,
    }
}

packed_struct! {
    /// Options of a write.
    pub struct ReplicateConfig {
        /// Memory replicas.
        pub replica_num: u64,
        /// NVMe-oF replicas.
        pub nof_replica_num: u64,
        /// Distributed file system replicas.
        pub dfs_replica_num: u64,
        /// `SoftPinAction`: preserve 0, enable 1, disable 2.
        pub soft_pin_action: u8,
        /// Soft pin TTL.
        pub soft_pin_ttl_ms: Option<u64>,
        /// Never evicted.
        pub with_hard_pin: bool,
        /// Segment names tried first.
        pub preferred_segments: Vec<String>,
        /// One preferred segment.
        pub preferred_segment: String,
        /// Preferred NVMe-oF segments.
        pub preferred_nof_segments: Vec<String>,
        /// Place on the writer's node first.
        pub prefer_alloc_in_same_node: bool,
        /// `ObjectDataType`.
        pub data_type: u8,
        /// The writer's host.
        pub host_id: String,
        /// Placement groups.
        pub group_ids: Option<Vec<String>>,
    }
}

packed_struct! {
    /// What `PutEnd` commits.
    pub struct ObjectMeta {
        /// The key.
        pub key: String,
        /// A checksum of the object, when the writer computed one.
        pub object_checksum: Option<u64>,
    }
}

packed_struct! {
    /// `AllocatedBuffer::Descriptor`: where a replica's bytes are.
    pub struct BufferDescriptor {
        /// Bytes.
        pub size: u64,
        /// Address in the owner's memory.
        pub buffer_address: u64,
        /// Transport.
        pub protocol: String,
        /// The owner's Transfer Engine endpoint.
        pub transport_endpoint: String,
    }
}

packed_struct! {
    /// A replica in memory (and, with the same shape, on NVMe-oF).
    pub struct MemoryDescriptor {
        /// Where.
        pub buffer_descriptor: BufferDescriptor,
    }
}

packed_struct! {
    /// A replica in a file.
    pub struct DiskDescriptor {
        /// The file.
        pub file_path: String,
        /// Bytes.
        pub object_size: u64,
    }
}

packed_struct! {
    /// A replica on a client's local disk.
    pub struct LocalDiskDescriptor {
        /// The client holding it.
        pub client_id: Uuid,
        /// Bytes.
        pub object_size: u64,
        /// The client's endpoint.
        pub transport_endpoint: String,
    }
}

packed_struct! {
    /// A replica in a distributed file system.
    pub struct DfsDescriptor {
        /// The file.
        pub file_path: String,
        /// Offset in the file.
        pub offset: u64,
        /// Bytes.
        pub object_size: u64,
        /// Bytes, aligned.
        pub aligned_size: u64,
        /// Shard index.
        pub shard_idx: i32,
    }
}

/// Where a replica lives: `std::variant<Memory, NoF, Disk, LocalDisk, DFS>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// In a mounted memory segment.
    Memory(MemoryDescriptor),
    /// On NVMe-oF.
    NoF(MemoryDescriptor),
    /// In a file.
    Disk(DiskDescriptor),
    /// On a client's local disk.
    LocalDisk(LocalDiskDescriptor),
    /// In a distributed file system.
    Dfs(DfsDescriptor),
}

impl Default for Placement {
    fn default() -> Self {
        Self::Memory(MemoryDescriptor::default())
    }
}

impl Pack for Placement {
    fn literal(out: &mut Vec<u8>) {
        out.push(0x86);
        MemoryDescriptor::literal(out);
        MemoryDescriptor::literal(out);
        DiskDescriptor::literal(out);
        LocalDiskDescriptor::literal(out);
        DfsDescriptor::literal(out);
        out.push(0xff);
    }
    fn max_len(&self) -> usize {
        match self {
            Self::Memory(d) | Self::NoF(d) => d.max_len(),
            Self::Disk(d) => d.max_len(),
            Self::LocalDisk(d) => d.max_len(),
            Self::Dfs(d) => d.max_len(),
        }
    }
    fn write(&self, w: &mut Writer) {
        match self {
            Self::Memory(d) => {
                w.bytes(&[0]);
                d.write(w);
            }
            Self::NoF(d) => {
                w.bytes(&[1]);
                d.write(w);
            }
            Self::Disk(d) => {
                w.bytes(&[2]);
                d.write(w);
            }
            Self::LocalDisk(d) => {
                w.bytes(&[3]);
                d.write(w);
            }
            Self::Dfs(d) => {
                w.bytes(&[4]);
                d.write(w);
            }
        }
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.tag("variant", 5)? {
            0 => Self::Memory(Pack::read(r)?),
            1 => Self::NoF(Pack::read(r)?),
            2 => Self::Disk(Pack::read(r)?),
            3 => Self::LocalDisk(Pack::read(r)?),
            _ => Self::Dfs(Pack::read(r)?),
        })
    }
}

/// `ReplicaStatus` values.
pub mod replica_status {
    /// Being written.
    pub const PROCESSING: i32 = 2;
    /// Readable.
    pub const COMPLETE: i32 = 3;
}

/// `ClientStatus` values.
pub mod client_status {
    /// Known and alive.
    pub const OK: i32 = 1;
    /// Unknown to the master: mount again.
    pub const NEED_REMOUNT: i32 = 2;
}

/// `SoftPinAction` values.
pub mod soft_pin_action {
    /// Keep what the object had.
    pub const PRESERVE: u8 = 0;
    /// Pin.
    pub const ENABLE: u8 = 1;
    /// Unpin.
    pub const DISABLE: u8 = 2;
}

/// `ReplicaType::MEMORY`.
pub const REPLICA_TYPE_MEMORY: i32 = 0;

packed_struct! {
    /// `Replica::Descriptor`.
    pub struct ReplicaDescriptor {
        /// Replica id.
        pub id: u64,
        /// Where it lives.
        pub placement: Placement,
        /// `ReplicaStatus`.
        pub status: i32,
    }
}

packed_struct! {
    /// `GetReplicaList`'s answer.
    pub struct ReplicaList {
        /// The replicas.
        pub replicas: Vec<ReplicaDescriptor>,
        /// The read lease granted.
        pub lease_ttl_ms: u64,
        /// The checksum `PutEnd` recorded.
        pub object_checksum: Option<u64>,
    }
}

packed_struct! {
    /// `Ping`'s answer.
    pub struct PingReply {
        /// The master's view version.
        pub view_version_id: i64,
        /// `ClientStatus`.
        pub client_status: i32,
    }
}

packed_struct! {
    /// `GetStorageConfig`'s answer.
    pub struct StorageConfig {
        /// Directory of the file storage tier.
        pub fsdir: String,
        /// Whether disk eviction is on.
        pub enable_disk_eviction: bool,
        /// Disk quota.
        pub quota_bytes: u64,
    }
}

packed_struct! {
    /// A task for a client (copy or move a replica).
    pub struct TaskAssignment {
        /// Task id.
        pub id: Uuid,
        /// `TaskType`.
        pub task_type: i32,
        /// JSON payload.
        pub payload: String,
        /// When made.
        pub created_at_ms_epoch: i64,
        /// Retries allowed.
        pub max_retry_attempts: u32,
    }
}

/// Mooncake's `ErrorCode`, carried inside `tl::expected`.
pub type Code = i32;

/// `tl::expected<T, ErrorCode>`.
pub type Expected<T> = Result<T, Code>;

/// The arguments of a function that takes none: an empty body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NoArgs;

/// How a function's arguments go on the wire: none is an empty body, one is its bare type,
/// more are a tuple.
pub trait Args: Sized {
    /// The body.
    fn encode_args(&self, with_literal: bool) -> Vec<u8>;
    /// From a body.
    fn decode_args(body: &[u8]) -> Result<Self, DecodeError>;
    /// The literal, `None` for no arguments.
    fn args_literal() -> Option<Vec<u8>>;
}

impl Args for NoArgs {
    fn encode_args(&self, _: bool) -> Vec<u8> {
        Vec::new()
    }
    fn decode_args(body: &[u8]) -> Result<Self, DecodeError> {
        match body.len() {
            0 => Ok(Self),
            n => Err(DecodeError::Trailing(n)),
        }
    }
    fn args_literal() -> Option<Vec<u8>> {
        None
    }
}

impl<T: Pack> Args for T {
    fn encode_args(&self, with_literal: bool) -> Vec<u8> {
        super::struct_pack::encode(self, with_literal)
    }
    fn decode_args(body: &[u8]) -> Result<Self, DecodeError> {
        super::struct_pack::decode(body)
    }
    fn args_literal() -> Option<Vec<u8>> {
        Some(super::struct_pack::literal_of::<T>())
    }
}

/// One of the master's functions.
pub trait Method {
    /// `WrappedMasterService::<NAME>`.
    const NAME: &'static str;
    /// The first four bytes of the MD5 of `mooncake::WrappedMasterService::<NAME>`.
    const ID: u32;
    /// Its arguments, in wire order.
    type Args: Args;
    /// Its reply.
    type Reply: Pack;
}

/// A client id.
pub type ClientUuid = Uuid;
/// Keys.
pub type Keys = Vec<String>;
/// A tenant: Mooncake's clients send `"default"`.
pub type Tenant = String;
/// `PutStart`/`UpsertStart`: client, key, total bytes, options, tenant.
pub type StartArgs = (ClientUuid, String, u64, ReplicateConfig, Tenant);
/// `BatchPutStart`/`BatchUpsertStart`: client, keys, sizes, options, tenant.
pub type BatchStartArgs = (ClientUuid, Keys, Vec<u64>, ReplicateConfig, Tenant);
/// A start's answer: the replicas to fill.
pub type StartReply = Expected<Vec<ReplicaDescriptor>>;

macro_rules! methods {
    ($($name:ident = $id:literal: $args:ty => $reply:ty;)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "`.")]
            #[derive(Debug, Clone, Copy)]
            pub struct $name;

            impl Method for $name {
                const NAME: &'static str = stringify!($name);
                const ID: u32 = $id;
                type Args = $args;
                type Reply = $reply;
            }
        )*

        /// Decodes a body of `function_id` (its arguments with `request`, else its reply) and
        /// encodes the value again, with the literal when the body had one: a body this side
        /// reads completely comes back byte for byte. `None` for an id not in the table.
        pub fn reencode(
            function_id: u32,
            request: bool,
            body: &[u8],
        ) -> Option<Result<Vec<u8>, DecodeError>> {
            let with_literal = super::struct_pack::has_literal(body);
            Some(match (function_id, request) {
                $(
                    ($id, true) => <$args as Args>::decode_args(body)
                        .map(|v| v.encode_args(with_literal)),
                    ($id, false) => super::struct_pack::decode::<$reply>(body)
                        .map(|v| super::struct_pack::encode(&v, with_literal)),
                )*
                _ => return None,
            })
        }

        /// Every function served: name, id, argument literal (`None`: no arguments), reply
        /// literal.
        pub fn table() -> Vec<(&'static str, u32, Option<Vec<u8>>, Vec<u8>)> {
            vec![$((
                stringify!($name),
                $id,
                <$args as Args>::args_literal(),
                super::struct_pack::literal_of::<$reply>(),
            ),)*]
        }
    };
}

methods! {
    ServiceReady = 0x7b81bb56: NoArgs => Expected<String>;
    GetStorageConfig = 0x8da9b0a6: NoArgs => Expected<StorageConfig>;
    GetFsdir = 0x3e585123: NoArgs => Expected<String>;
    MountSegment = 0x3e7ec4bb: (Segment, ClientUuid) => Expected<()>;
    ReMountSegment = 0x0b053b72: (Vec<Segment>, ClientUuid) => Expected<()>;
    UnmountSegment = 0x6f10b465: (Uuid, ClientUuid) => Expected<()>;
    GracefulUnmountSegment = 0xa4ec3175: (Uuid, ClientUuid, u64) => Expected<()>;
    Ping = 0xd6c2dae5: ClientUuid => Expected<PingReply>;
    FetchTasks = 0xdf141844: (ClientUuid, u64) => Expected<Vec<TaskAssignment>>;
    ExistKey = 0x89385f09: (String, Tenant) => Expected<bool>;
    BatchExistKey = 0xb89fa6b0: (Keys, Tenant) => Vec<Expected<bool>>;
    GetReplicaList = 0x1f7ef174: (String, Tenant) => Expected<ReplicaList>;
    BatchGetReplicaList = 0x1b0d20ff: (Keys, Tenant) => Vec<Expected<ReplicaList>>;
    PutStart = 0x65ea9ac1: StartArgs => StartReply;
    PutEnd = 0x8e8b2099: (ClientUuid, ObjectMeta, i32, Tenant) => Expected<()>;
    PutRevoke = 0xa0767c44: (ClientUuid, String, i32, Tenant) => Expected<()>;
    BatchPutStart = 0x56be1822: BatchStartArgs => Vec<StartReply>;
    BatchPutEnd = 0x80e020ab: (ClientUuid, Vec<ObjectMeta>, i32, Tenant) => Vec<Expected<()>>;
    BatchPutRevoke = 0xb82567aa: (ClientUuid, Keys, i32, Tenant) => Vec<Expected<()>>;
    UpsertStart = 0xa1335e41: StartArgs => StartReply;
    UpsertEnd = 0x2e20e258: (ClientUuid, ObjectMeta, i32, Tenant) => Expected<()>;
    UpsertRevoke = 0x610b042e: (ClientUuid, String, i32, Tenant) => Expected<()>;
    BatchUpsertStart = 0xd564b423: BatchStartArgs => Vec<StartReply>;
    BatchUpsertEnd = 0xb1bcd72f: (ClientUuid, Vec<ObjectMeta>, Tenant) => Vec<Expected<()>>;
    BatchUpsertRevoke = 0x9093ae79: (ClientUuid, Keys, Tenant) => Vec<Expected<()>>;
    Remove = 0xf1b09774: (String, bool, Tenant) => Expected<()>;
    BatchRemove = 0x5902407d: (Keys, bool, Tenant) => Vec<Expected<()>>;
    RemoveByRegex = 0xfccc1fd3: (String, bool, Tenant) => Expected<i64>;
    RemoveAll = 0xd978ceb0: (bool, Tenant) => i64;
}

#[cfg(test)]
mod tests {
    use super::super::struct_pack::md5_32;
    use super::*;

    #[test]
    fn ids_are_the_md5_of_the_qualified_names() {
        for (name, id, _, _) in table() {
            let qualified = format!("mooncake::WrappedMasterService::{name}");
            assert_eq!(md5_32(qualified.as_bytes()), id, "{name}");
        }
        assert_eq!(table().len(), 29);
    }
}
