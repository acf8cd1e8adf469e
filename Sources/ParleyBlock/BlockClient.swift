import Logging
import NIOCore
import NIOPosix
import Parley

/// A block protocol client: one session over one Parley connection.
public final class BlockClient: Sendable {
    public let client: ParleyClient
    public let sessionName: String
    public let protocolVersion: UInt32
    /// This connection's number on the server (SessionInfoReply.connection_id; 0 from a
    /// server that does not give one), for `fence`.
    public let connectionID: UInt64
    /// The server granted DIRECT IO on this connection (docs/protocol.md 17.9): `io` sends
    /// DIRECT frames instead of `Io` messages.
    public let usesDirect: Bool

    /// A device this client has open.
    public struct Device: Sendable, Equatable {
        public var id: UInt32
        public var geometry: Parley_Block_V1_Geometry
        public init(id: UInt32, geometry: Parley_Block_V1_Geometry) {
            self.id = id
            self.geometry = geometry
        }
    }

    private init(client: ParleyClient, sessionName: String, protocolVersion: UInt32, connectionID: UInt64, usesDirect: Bool) {
        self.usesDirect = usesDirect
        self.client = client
        self.sessionName = sessionName
        self.protocolVersion = protocolVersion
        self.connectionID = connectionID
    }

    /// Connects and starts a session. `clientInstance` (not 0) lets this connection fence,
    /// and be fenced by, the other connections of the same session name and instance.
    /// `direct`: ask for DIRECT IO, used when the server grants it (feature bit 4 negotiated,
    /// not a lossless session); false sends every IO as an `Io` message. `connected` is told
    /// of the Parley connection as soon as it is up, before `SessionInfo` is answered (for a
    /// caller that may have to close it, e.g. on a timeout); false: it is closed at once.
    public static func connect(to address: ParleyAddress, sessionName: String, clientInstance: UInt64 = 0, direct: Bool = true,
                               configuration: ParleyClient.Configuration = .defaults,
                               logger: Logger = Logger(label: "parley.block.client"),
                               group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                               connected: (@Sendable (ParleyClient) -> Bool)? = nil) async throws -> BlockClient {
        let client = try await ParleyClient.connect(to: address, configuration: configuration, logger: logger, group: group)
        if let connected, !connected(client) {
            client.close()
            throw ParleyError(code: .connectionClosed, message: "the connection to \(address) was given up as it came up")
        }
        do {
            var info = Parley_Block_V1_SessionInfo()
            info.protocolVersion = BlockService.protocolVersion
            info.sessionName = sessionName
            info.clientInstance = clientInstance
            info.directIo = direct && client.connection.mayUseDirect
            let reply = try await client.request(info, as: Parley_Block_V1_SessionInfoReply.self)
            try Self.check(reply.status, reply.message)
            return BlockClient(client: client, sessionName: sessionName, protocolVersion: reply.protocolVersion, connectionID: reply.connectionID,
                               usesDirect: info.directIo && reply.directIo)
        } catch {
            client.close()
            throw error
        }
    }

    static func check(_ status: Parley_Block_V1_BlockStatus, _ message: String) throws(BlockError) {
        if status != .ok { throw BlockError(status, message) }
    }

    public func listExports() async throws -> [Parley_Block_V1_ExportEntry] {
        try await self.client.request(Parley_Block_V1_ListExports(), as: Parley_Block_V1_ExportList.self).exports
    }

    public func open(_ path: String, access: Parley_Block_V1_AccessMode = .readWrite) async throws -> Device {
        var open = Parley_Block_V1_Open()
        open.path = path
        open.accessMode = access
        let reply = try await self.client.request(open, as: Parley_Block_V1_OpenReply.self)
        try Self.check(reply.status, reply.message)
        if let unusable = Self.unusable(reply.geometry) {
            // Opened there: closed again, not left open on a server this client cannot use.
            try? await self.close(Device(id: reply.deviceID, geometry: reply.geometry), timeout: .seconds(5))
            throw ParleyError(code: .protocolViolation, message: "the server's geometry of \(path) cannot be used: \(unusable) (docs/protocol.md 17.5)")
        }
        return Device(id: reply.deviceID, geometry: reply.geometry)
    }

    /// What makes a device's geometry unusable (docs/protocol.md 17.5), or nil: a logical
    /// block size that is not a power of two from 512 to 65536 (NBD clients and the kernel
    /// need one; IO is aligned to it), a largest IO below one block.
    static func unusable(_ g: Parley_Block_V1_Geometry) -> String? {
        let block = g.logicalBlockSize
        guard block >= 512, block <= 65536, block & (block - 1) == 0 else {
            return "logical_block_size \(block) is not a power of two from 512 to 65536"
        }
        guard g.maxIoSize >= block else { return "max_io_size \(g.maxIoSize) is less than one \(block)-byte block" }
        return nil
    }

    /// Closes `device` on this connection; `timeout`: how long the server may take to answer.
    public func close(_ device: Device, timeout: Duration? = nil) async throws {
        var close = Parley_Block_V1_Close()
        close.deviceID = device.id
        let reply = try await self.client.request(close, as: Parley_Block_V1_CloseReply.self, timeout: timeout)
        try Self.check(reply.status, reply.message)
    }

    /// Fences connections of this client (docs/protocol.md 17.8): returns once no IO of
    /// theirs can still run on the server; their later IO is refused (BLOCK_STATUS_FENCED).
    public func fence(_ connectionIDs: [UInt64]) async throws {
        var fence = Parley_Block_V1_Fence()
        fence.connectionIds = connectionIDs
        let reply = try await self.client.request(fence, as: Parley_Block_V1_FenceReply.self)
        try Self.check(reply.status, reply.message)
    }

    /// Sends one IO and returns the read data (nil for other operations).
    @discardableResult
    public func io(_ device: Device, _ operation: Parley_Block_V1_IoOperation, offset: UInt64, length: UInt32,
                   data: ByteBuffer? = nil, fua: Bool = false) async throws -> ByteBuffer? {
        if self.usesDirect {
            return try await withCheckedThrowingContinuation { c in
                self.io(device, operation, offset: offset, length: length, data: data, fua: fua) { c.resume(with: $0) }
            }
        }
        let io = Self.request(device, operation, offset: offset, length: length, fua: fua)
        let reply = try await self.client.call(io, data: data, as: Parley_Block_V1_IoReply.self)
        try Self.check(reply.message.status, reply.message.message)
        if let wrong = Self.wrongReadData(operation, length: length, reply.data) { throw self.malformed(wrong) }
        return reply.data
    }

    /// What is wrong with a successful `Io` answer's data: a read carries exactly `length`
    /// bytes (docs/protocol.md 17.2), as a DIRECT answer does; nil if nothing is.
    static func wrongReadData(_ operation: Parley_Block_V1_IoOperation, length: UInt32, _ data: ByteBuffer?) -> String? {
        guard operation == .read, (data?.readableBytes ?? 0) != Int(length) else { return nil }
        return "an answer to a read of \(length) bytes carried \(data.map { "\($0.readableBytes) bytes" } ?? "no data")"
    }

    /// The server broke the protocol: the connection ends, and the IO fails as on a connection
    /// that ended (a multipath client sends it on another path).
    private func malformed(_ message: String) -> ParleyError {
        self.client.connection.close(ParleyError(code: .malformedPayload, message: message))
        return ParleyError(code: .connectionClosed, message: "connection closed: \(message)")
    }

    /// Sends one IO; `completion` runs once with the read data (nil for other operations) or
    /// the error (`BlockError` for a refusal), on the connection's event loop: no task per IO.
    public func io(_ device: Device, _ operation: Parley_Block_V1_IoOperation, offset: UInt64, length: UInt32,
                   data: ByteBuffer? = nil, fua: Bool = false, completion: @escaping @Sendable (Result<ByteBuffer?, any Error>) -> Void) {
        let allocator = self.client.connection.channelAllocator
        self.io(device, operation, offset: offset, length: length, dataPieces: data.map { ByteBufferPieces($0) }, fua: fua) { result in
            completion(result.map { $0?.gathered(allocator: allocator) })
        }
    }

    /// `io` with data in pieces both ways: a write's data as the reads that brought it (over
    /// DIRECT, large data is sent from its own buffers, not gathered first; an `Io` message
    /// gathers it), and a large read's data as the reads it arrived in.
    public func io(_ device: Device, _ operation: Parley_Block_V1_IoOperation, offset: UInt64, length: UInt32,
                   dataPieces data: ByteBufferPieces?, fua: Bool = false, completion: @escaping @Sendable (Result<ByteBufferPieces?, any Error>) -> Void) {
        if self.usesDirect {
            return self.direct(device, operation, offset: offset, length: length, data: data, fua: fua, completion: completion)
        }
        let io = Self.request(device, operation, offset: offset, length: length, fua: fua)
        self.client.call(io, data: data?.gathered(allocator: self.client.connection.channelAllocator), as: Parley_Block_V1_IoReply.self) { result in
            completion(result.flatMap { reply in
                guard reply.message.status == .ok else { return .failure(BlockError(reply.message.status, reply.message.message)) }
                if let wrong = Self.wrongReadData(operation, length: length, reply.data) { return .failure(self.malformed(wrong)) }
                return .success(reply.data.map { ByteBufferPieces($0) })
            })
        }
    }

    /// One IO as a DIRECT frame. The answer's status becomes a `BlockError` (DIRECT answers
    /// carry no message: it names the operation and the status); a connection that ends
    /// first fails it with its `ParleyError`, as for `Io`.
    private func direct(_ device: Device, _ operation: Parley_Block_V1_IoOperation, offset: UInt64, length: UInt32,
                        data: ByteBufferPieces?, fua: Bool, completion: @escaping @Sendable (Result<ByteBufferPieces?, any Error>) -> Void) {
        let connection = self.client.connection
        let request = BlockDirect.Request(operation: UInt8(truncatingIfNeeded: operation.rawValue), flags: fua ? 1 : 0, deviceID: device.id,
                                          offset: offset, length: length)
        let frame = data.map { request.frame(allocator: connection.channelAllocator, data: $0) }
            ?? request.frame(allocator: connection.channelAllocator, data: nil)
        connection.sendDirect(frame) { result in
            switch result {
            case .failure(let error):
                completion(.failure(error))
            case .success(let frame):
                func malformed(_ message: String) { completion(.failure(self.malformed(message))) }
                switch BlockDirect.Answer.decode(frame) {
                case .failure(let e):
                    malformed(e.message)
                case .success(let answer) where answer.status == .ok:
                    // Exactly `length` bytes for a read, none for the rest (docs/protocol.md 17.9).
                    let expected: Int? = operation == .read ? Int(length) : nil
                    guard answer.data?.readableBytes == expected else {
                        return malformed("a DIRECT answer to a \(operation) of \(length) bytes carried \(answer.data.map { "\($0.readableBytes) bytes" } ?? "no data")")
                    }
                    completion(.success(answer.data))
                case .success(let answer):
                    completion(.failure(BlockError(answer.status, "\(operation) of \(length) bytes at offset \(offset) on device \(device.id): \(answer.status)")))
                }
            }
        }
    }

    static func request(_ device: Device, _ operation: Parley_Block_V1_IoOperation, offset: UInt64, length: UInt32, fua: Bool) -> Parley_Block_V1_Io {
        var io = Parley_Block_V1_Io()
        io.deviceID = device.id
        io.offset = offset
        io.length = length
        io.operation = operation
        io.flags = fua ? UInt32(Parley_Block_V1_IoFlag.fua.rawValue) : 0
        return io
    }

    public func read(_ device: Device, offset: UInt64, length: UInt32) async throws -> ByteBuffer {
        try await self.io(device, .read, offset: offset, length: length) ?? ByteBuffer()
    }

    public func write(_ device: Device, offset: UInt64, data: ByteBuffer, fua: Bool = false) async throws {
        try await self.io(device, .write, offset: offset, length: UInt32(data.readableBytes), data: data, fua: fua)
    }

    public func flush(_ device: Device) async throws {
        try await self.io(device, .flush, offset: 0, length: 0)
    }

    public func closeConnection() {
        self.client.close()
    }
}
