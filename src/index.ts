/**
 * Mooncake for Node.js: the Transfer Engine (batched one-sided reads and writes between
 * registered memory of processes), its metadata server, Mooncake Store (a replicated
 * distributed object cache whose master keeps metadata only), and the P2P Store (checkpoints
 * pulled from every node that holds them).
 *
 * @packageDocumentation
 */
export {
  Batch,
  TransferEngine,
  type BufferDescriptor,
  type NotifyEvent,
  type PriorityMatrix,
  type ReadWriteOptions,
  type RailStats,
  type Segment,
  type TaskStatus,
  type TaskStatusName,
  type TransferEngineOptions,
  type TransferOptions,
  type TransferRequest,
  type TransportName,
  type TransportStats,
} from './engine'
export { ERROR_CODES, MooncakeError, type MooncakeErrorCode } from './errors'
export { MasterServer, type MasterServerOptions } from './master'
export { MetadataServer, startMetadataServer, type MetadataServerOptions } from './metadata-server'
export {
  P2PStore,
  type GetReplicaOptions,
  type P2PStoreOptions,
  type PayloadInfo,
  type PullProgress,
  type PullReport,
  type PullSource,
  type RegisterOptions,
} from './p2p'
export { MooncakeStore, type MooncakeStoreOptions, type PutOptions, type RemoveOptions } from './store'
