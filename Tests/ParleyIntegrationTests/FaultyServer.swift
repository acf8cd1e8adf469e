import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Foundation
import Parley
import ParleyConformance
import ParleyServices
import ParleyWire
import SwiftProtobuf
import Testing

/// A deliberately faulty Parley server for the conformance tests: a proxy in front of a
/// correct server that breaks one requirement of docs/protocol.md, by rewriting frames as
/// they pass (with CRCs made right again, so that only the one rule is broken). Bytes it
/// cannot follow as frames (a bad magic, a preamble with a wrong CRC) pass unchanged.
final class FaultyServer: Sendable {
    enum Fault: String, CaseIterable, Sendable, CustomTestStringConvertible {
        /// None: a transparent proxy (the control case).
        case none
        /// The server's large frames (over 1 MiB: the zero-copy path) carry a wrong segment CRC.
        case wrongCRCOnLargeFrames
        /// The server ignores a feature bit a client requires but it does not know.
        case ignoresRequiredUnknownFeatures
        /// The server ignores CANCEL: a cancelled request runs on and is answered.
        case answersCancelledRequests
        /// The server sets a frame flag on its ERROR messages.
        case flagsOnErrors
        /// The server reports a tampered handshake as a failed authentication.
        case wrongCodeForTampering
        /// The server resumes a session without sending again what the client lacks.
        case forgetsOnResume

        // Faults of a server that does not check what a client sends: the proxy makes the
        // bad input good before the server sees it, drops it (the server skips it), or drops
        // it and all that follows (the server waits for ever). A check expecting a refusal
        // then sees none.

        /// Accepts a banner whose CRC is wrong.
        case acceptsBannerWithWrongCRC
        /// Accepts a banner of version 0.
        case acceptsVersionZero
        /// Does not check preamble CRCs of MESSAGEs (and stops reading at one that is wrong).
        case ignoresPreambleCRC
        /// Does not check the segment count: a preamble of 0 or 5 segments stops its reading.
        case ignoresSegmentCount
        /// Does not check preamble byte 3.
        case ignoresPreambleByte3
        /// Does not check that unused segment descriptors are zero.
        case ignoresUnusedDescriptors
        /// Does not check segment CRCs.
        case ignoresSegmentCRCs
        /// Takes a client HELLO of entity type SERVER for a client's.
        case acceptsServerEntityType
        /// Skips unknown critical tags as if they were ignorable.
        case skipsUnknownCriticalTags
        /// Skips a NOTICE from a client.
        case skipsNoticesFromClients
        /// Skips a KEEPALIVE whose segment is not 8 bytes.
        case skipsShortKeepalives
        /// Skips an ACK whose segment is not 8 bytes.
        case skipsShortAcks
        /// Skips a MESSAGE of one segment.
        case skipsOneSegmentMessages
        /// Skips a MESSAGE whose header is shorter than 32 bytes.
        case skipsShortHeaders
        /// Skips a MESSAGE whose type name is longer than 1024 bytes.
        case skipsOverlongTypeNames
        /// Skips a MESSAGE of an unknown kind.
        case skipsUnknownKinds
        /// Does not check message header bytes 28-31.
        case ignoresHeaderReservedBytes
        /// Does not check message header flags.
        case ignoresHeaderFlags
        /// Does not check frame flags on MESSAGEs.
        case ignoresFrameFlagsOnMessages

        /// Waits for more bytes after a banner whose magic is wrong.
        case waitsAfterBadMagic
        /// Skips a CLIENT_IDENT that does not decode (a name that is not UTF-8).
        case skipsUndecodableClientIdents
        /// Skips a first HELLO that does not decode.
        case skipsUndecodableHellos
        /// Skips a HELLO after the first.
        case skipsHellosInTheSession
        /// Skips a SERVER_IDENT from the client.
        case skipsServerIdentsFromClients
        /// Skips a CLOSE from the client in the handshake.
        case ignoresCloseInTheHandshake
        /// Skips a CLOSE from the client in the session.
        case ignoresCloseInTheSession
        /// Skips an AUTH_REQUEST_MORE whose proof does not decode.
        case skipsUndecodableAuthMore
        /// Skips a secret AUTH_REQUEST whose challenge is not 32 bytes.
        case skipsShortChallenges
        /// Takes method none offering only secure mode as if it had offered crc.
        case ignoresModeMismatch
        /// Skips a MESSAGE whose header segment is longer than its type name says.
        case skipsLongHeaders
        /// Skips a MESSAGE whose type name is not UTF-8.
        case skipsNonUTF8TypeNames
        /// Skips a first MESSAGE of a new session whose seq is not 1.
        case skipsMisnumberedFirstMessages
        /// Skips a CANCEL when the client did not offer streams.
        case skipsCancelsWithoutStreams
        /// Skips a MESSAGE with a data segment when the client did not offer dataSegment.
        case skipsDataSegmentsWithoutTheFeature
        /// Skips a KEEPALIVE when the client did not offer keepalive.
        case skipsKeepalivesWithoutTheFeature
        /// Skips an ACK when the client did not offer lossless sessions.
        case skipsAcksWithoutLosslessSessions
        /// Skips a SESSION_RECONNECT when the client did not offer lossless sessions.
        case skipsReconnectsWithoutLosslessSessions
        /// Skips a SESSION_RECONNECT whose token is not 16 bytes.
        case skipsShortSessionTokens
        /// Ignores the client's frame-size limit of 1 (which counts as 65536).
        case ignoresTheClientsFrameLimit
        /// Acknowledges 100 more than it received.
        case acksTooHigh

        // Faults of a server that refuses what it must accept (it hangs up).

        /// Hangs up on a client that supports (not requires) unknown feature bits.
        case refusesUnknownOptionalFeatures
        /// Hangs up on a banner of a version above 1.
        case refusesNewerVersions
        /// Hangs up on a control frame of more than one segment or a MESSAGE of four.
        case refusesExtraSegments
        /// Hangs up on an ignorable tag (0x80 and above).
        case refusesIgnorableTags
        /// Hangs up on flags set on a control frame.
        case refusesFlagsOnControlFrames
        /// Hangs up on a client HELLO with an empty peer_address.
        case refusesEmptyPeerAddress

        // Faults of a server that answers wrongly.

        /// A KEEPALIVE_ACK whose timestamp differs from the KEEPALIVE's by one bit.
        case wrongKeepaliveAckStamp
        /// Data segments sent with alignment hint 0.
        case noDataSegmentAlignment
        /// ERROR invalidArgument for a request of an unknown type.
        case wrongCodeForUnknownTypes
        /// ERROR invalidArgument for a request whose payload does not decode.
        case wrongCodeForBadPayloads
        /// The third item of a stream says it is the eighth.
        case wrongStreamItem
        /// An empty data segment is answered without one.
        case dropsEmptyDataSegments
        /// AUTH_BAD_METHOD names no method.
        case badMethodNamesNothing

        /// The requirement ids of the checks that must fail, one entry per check; every other
        /// check must pass.
        var breaks: [String] {
            switch self {
            case .none: return []
            case .wrongCRCOnLargeFrames: return ["R-4.4-3"]
            case .ignoresRequiredUnknownFeatures: return ["R-3-7"]
            case .answersCancelledRequests: return ["R-7.7-1", "R-7.7-1"]
            case .flagsOnErrors: return ["R-4.9-2"]
            case .wrongCodeForTampering: return ["R-5.1-4"]
            case .forgetsOnResume: return ["R-5.2-11"]
            case .acceptsBannerWithWrongCRC: return ["R-3-2"]
            case .acceptsVersionZero: return ["R-3-3"]
            case .ignoresPreambleCRC: return ["R-4.4-1"]
            case .ignoresSegmentCount: return ["R-4.4-2", "R-4.4-2"]
            // Both checks that set byte 3: of a MESSAGE's preamble and of a KEEPALIVE's.
            case .ignoresPreambleByte3: return ["R-4.4-2", "R-9-1"]
            case .ignoresUnusedDescriptors: return ["R-4.4-2"]
            // The refusal, and what follows it: the request behind the bad CRC is answered.
            case .ignoresSegmentCRCs: return ["R-4.4-4", "R-4.4-5"]
            case .acceptsServerEntityType: return ["R-6.1-3"]
            // Tag 0x30, and the CLOSE code check's 0x31.
            case .skipsUnknownCriticalTags: return ["R-4.8-3", "R-10-1"]
            case .skipsNoticesFromClients: return ["R-4.8-4"]
            case .skipsShortKeepalives: return ["R-7.12-2"]
            case .skipsShortAcks: return ["R-5.2-5"]
            case .skipsOneSegmentMessages: return ["R-7.1-1"]
            case .skipsShortHeaders: return ["R-7.2-2"]
            case .skipsOverlongTypeNames: return ["R-7.2-2"]
            case .skipsUnknownKinds: return ["R-7.2-4"]
            case .ignoresHeaderReservedBytes: return ["R-7.2-2"]
            case .ignoresHeaderFlags: return ["R-7.2-7"]
            case .ignoresFrameFlagsOnMessages: return ["R-4.9-3"]
            case .waitsAfterBadMagic: return ["R-3-1"]
            case .skipsUndecodableClientIdents: return ["R-2-2"]
            case .skipsUndecodableHellos: return ["R-4.7-3"]
            // A HELLO in the session, decodable or not.
            case .skipsHellosInTheSession: return ["R-4.8-2", "R-4.8-4"]
            case .skipsServerIdentsFromClients: return ["R-4.8-4"]
            case .ignoresCloseInTheHandshake: return ["R-4.8-5"]
            // A CLOSE of an unknown code, and one with a request behind it.
            case .ignoresCloseInTheSession: return ["R-7.9-1", "R-7.13-1"]
            case .skipsUndecodableAuthMore: return ["R-5.1-4"]
            case .skipsShortChallenges: return ["R-5.1-2"]
            case .ignoresModeMismatch: return ["R-5.1-11"]
            case .skipsLongHeaders: return ["R-7.2-2"]
            case .skipsNonUTF8TypeNames: return ["R-7.2-2"]
            case .skipsMisnumberedFirstMessages: return ["R-7.2-3"]
            case .skipsCancelsWithoutStreams: return ["R-7.2-5"]
            case .skipsDataSegmentsWithoutTheFeature: return ["R-7.2-6"]
            case .skipsKeepalivesWithoutTheFeature: return ["R-7.12-3"]
            case .skipsAcksWithoutLosslessSessions: return ["R-5.2-5"]
            case .skipsReconnectsWithoutLosslessSessions: return ["R-5.2-7"]
            case .skipsShortSessionTokens: return ["R-5.2-7"]
            case .ignoresTheClientsFrameLimit: return ["R-4.5-2"]
            case .acksTooHigh: return ["R-7.3-1"]
            case .refusesUnknownOptionalFeatures: return ["R-3-8"]
            case .refusesNewerVersions: return ["R-3-4"]
            case .refusesExtraSegments: return ["R-4.7-1", "R-4.7-1"]
            case .refusesIgnorableTags: return ["R-4.8-1"]
            case .refusesFlagsOnControlFrames: return ["R-4.9-1"]
            case .refusesEmptyPeerAddress: return ["R-6.1-1"]
            case .wrongKeepaliveAckStamp: return ["R-7.12-1"]
            case .noDataSegmentAlignment: return ["R-7.1-3"]
            case .wrongCodeForUnknownTypes: return ["R-7.5-1"]
            case .wrongCodeForBadPayloads: return ["R-7.5-2"]
            case .wrongStreamItem: return ["R-7.6-3"]
            case .dropsEmptyDataSegments: return ["R-7.10-1"]
            // Both checks of AUTH_BAD_METHOD's method: for tls and for an unknown method.
            case .badMethodNamesNothing: return ["R-5.1-1", "R-6.1-4"]
            }
        }

        var testDescription: String { self.rawValue }
    }

    /// Blunt breakages for showing that every check can fail: each check is run against them
    /// until one makes it fail (a check no breakage of the server's answers can fail would be
    /// a check that cannot fail).
    enum Mutation: String, CaseIterable, Sendable, CustomTestStringConvertible {
        /// The server never closes a connection and its CLOSE frames are dropped: every
        /// refusal goes unsaid.
        case holdOpen
        /// After the handshake (SERVER_IDENT, SESSION_RESUMED or SESSION_RESET, or the first
        /// sealed bytes) the server says nothing more and never closes: answers, streams,
        /// refusals and KEEPALIVE_ACKs go missing.
        case mute
        /// The server's handshake says wrong things: a HELLO limit of 1000 bytes, an
        /// AUTH_BAD_METHOD naming no method, one session token for every session, no
        /// SESSION_RESET; and it refuses a client HELLO with an empty `peer_address`.
        case lies
        /// The server's banner requires a feature it does not support (bit 40). Its probe is
        /// not spared: the banner is what the check reads.
        case requiresUnknownFeature

        var testDescription: String { self.rawValue }
        /// Whether the runner's probe connection is spared this mutation.
        var sparesProbe: Bool { self != .requiresUnknownFeature }
    }

    let fault: Fault
    let mutation: Mutation?
    private let upstreamPort: Int
    private let channel = NIOLockedValueBox<(any Channel)?>(nil)

    /// Both ends of every proxied connection, closed by `stop()`.
    private let children = NIOLockedValueBox<[any Channel]>([])
    /// Connections accepted so far: the first `spared` pass without the mutation.
    private let accepted = NIOLockedValueBox(0)
    let spared: Int

    /// - Parameter spared: with a mutation, the number of first connections it spares (the
    ///   runner's probe, which must learn the server as it is, or the checks would skip).
    /// The event loops of the proxy's connections.
    let group: any EventLoopGroup

    init(fault: Fault, upstreamPort: Int, mutation: Mutation? = nil, spared: Int = 0, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) {
        self.group = group
        self.fault = fault
        self.mutation = mutation
        self.upstreamPort = upstreamPort
        self.spared = spared
    }

    /// Listens on 127.0.0.1 and returns the port.
    func start() async throws -> Int {
        let (fault, port, spared, accepted, children) = (self.fault, self.upstreamPort, self.spared, self.accepted, self.children)
        let mutation = self.mutation
        let server = try await ServerBootstrap(group: self.group)
            .childChannelOption(.autoRead, value: false)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { inbound in
                let number = accepted.withLockedValue { n in defer { n += 1 }; return n }
                let mutation = number < spared ? nil : mutation
                return ClientBootstrap(group: inbound.eventLoop)
                    .channelOption(.allowRemoteHalfClosure, value: true)
                    .connect(host: "127.0.0.1", port: port)
                    .flatMapThrowing { outbound in
                        children.withLockedValue { $0 += [inbound, outbound] }
                        // With a mutation the server's side never closes the client's.
                        try outbound.pipeline.syncOperations.addHandler(Forwarder(
                            partner: inbound, rewriter: FrameRewriter(fault: fault, toClient: true, mutation: mutation), closesPartner: mutation == nil
                        ))
                        try inbound.pipeline.syncOperations.addHandler(Forwarder(partner: outbound, rewriter: FrameRewriter(fault: fault, toClient: false, mutation: mutation)))
                    }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        self.channel.withLockedValue { $0 = server }
        return server.localAddress!.port!
    }

    /// Stops listening and closes every connection still open (a mutation holds the
    /// client's side open when the server closes; a server shutting down waits for its
    /// connections to close).
    func stop() async {
        let channel = self.channel.withLockedValue { c in defer { c = nil }; return c }
        try? await channel?.close()
        for child in self.children.withLockedValue({ c in defer { c = [] }; return c }) { child.close(promise: nil) }
    }
}

extension FaultyServer {
    /// Runs `parley conform`'s checks (those of `only`, or all) through this proxy, started
    /// for the run and stopped after it.
    func conform(secret: SecretCredentials, timeout: Duration, only: [String] = []) async throws -> ConformanceReport {
        let port = try await self.start()
        let target = ConformanceTarget(address: .tcp(host: "127.0.0.1", port: port), secret: secret, group: self.group)
        let report = try await ConformanceRunner(target: target, timeout: timeout, only: only).run()
        await self.stop()
        return report
    }

    /// The correct server the faulty ones stand in front of: in process, methods none and
    /// secret in crc and secure mode, with a key for `client.alice`. `body` gets its TCP port,
    /// alice's credentials and the event loop group for the proxies.
    ///
    /// The server, the proxies and the checks' connections share one event loop of their own:
    /// the checks move hundreds of megabytes (the 16 MiB of R-7.15-2, the maximal frame of
    /// R-4.4-3, each fault after fault), and on NIO's shared two loops that starved the other
    /// tests of a full parallel run for a minute now and then (PostgreSQL answers unread,
    /// lossless sessions expiring). One loop keeps it to one core.
    static func withUpstream(_ name: String, _ body: (_ port: Int, _ alice: SecretCredentials, _ group: any EventLoopGroup) async throws -> Void) async throws {
        let path = freshTestDirectory(name) + "/server.keyring"
        let keys = try writeKeyring(path, [("client.alice", ["*"])])
        let keyring = try ParleyKeyringSource(path: path)
        let alice = SecretCredentials(entity: "client.alice", key: try #require(keys["client.alice"]))
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        do {
            try await withServer(
                configure: { $0.authMethods = [AuthMethod.none, AuthMethod.secret]; $0.modes = [.crc, .secure]; $0.keyring = keyring }, group: group
            ) { _, addresses in
                guard case .tcp(_, let port) = addresses[0].kind else { throw ParleyError(code: .invalidArgument, message: "not TCP") }
                try await body(port, alice, group)
            }
        } catch {
            try? await group.shutdownGracefully()
            throw error
        }
        try await group.shutdownGracefully()
    }
}

/// Copies one direction to the partner channel (both on one event loop), through a rewriter.
private final class Forwarder: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let partner: any Channel
    var rewriter: FrameRewriter
    let closesPartner: Bool

    init(partner: any Channel, rewriter: FrameRewriter, closesPartner: Bool = true) {
        self.partner = partner
        self.rewriter = rewriter
        self.closesPartner = closesPartner
    }

    /// The client's side reads only once the server's side is connected (and this handler
    /// is there to forward what it reads).
    func channelActive(context: ChannelHandlerContext) {
        try? context.channel.syncOptions?.setOption(ChannelOptions.autoRead, value: true)
        context.read()
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let out = self.rewriter.feed(self.unwrapInboundIn(data))
        if self.rewriter.hangUp {
            context.close(promise: nil)
            self.partner.close(promise: nil)
            return
        }
        if out.readableBytes > 0 { self.partner.writeAndFlush(out, promise: nil) }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event, self.closesPartner { self.partner.close(mode: .output, promise: nil) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if self.closesPartner { self.partner.close(promise: nil) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

/// Follows one direction as a banner and frames, and applies the fault. Frames of up to
/// 1 MiB are held until complete and rewritten whole; larger ones are passed on as they
/// come (so that a preamble announcing a huge frame still reaches the server at once).
struct FrameRewriter {
    let fault: FaultyServer.Fault
    let toClient: Bool
    let mutation: FaultyServer.Mutation?
    /// `mute`: the handshake is over, nothing more goes to the client.
    private var muted = false
    private var buffer = ByteBuffer()
    private var bannerDone = false
    /// Bytes of a large frame's body still to pass, and where its last segment's CRC starts.
    private var streaming: (left: Int, lastCRCAt: Int)?
    private var passthrough = false
    /// A SESSION_RESUMED went by: the MESSAGEs sent again right after it are dropped.
    private var resumed = false
    /// The server has stopped reading this connection (a fault): the client's bytes go nowhere.
    private var swallowing = false
    /// The server hangs up (a fault): the proxy closes both connections.
    private(set) var hangUp = false
    /// What the client's side showed so far: the features its banner offers, whether its
    /// first HELLO and its CLIENT_IDENT (or SESSION_RECONNECT) went by, how many MESSAGEs.
    private var clientOffers: UInt64 = 0
    private var helloSeen = false
    private var identSeen = false
    private var reconnecting = false
    private var messagesSeen = 0
    private static let large = 1 << 20

    init(fault: FaultyServer.Fault, toClient: Bool, mutation: FaultyServer.Mutation? = nil) {
        self.fault = fault
        self.toClient = toClient
        self.mutation = mutation
    }

    /// The bytes to pass on for `bytes`: the same, less what the fault or mutation changes.
    mutating func feed(_ bytes: ByteBuffer) -> ByteBuffer {
        self.follow(bytes)
    }

    private mutating func follow(_ bytes: ByteBuffer) -> ByteBuffer {
        if self.swallowing { return ByteBuffer() }
        var bytes = bytes
        self.buffer.writeBuffer(&bytes)
        var out = ByteBuffer()
        while true {
            if self.passthrough {
                // Sealed frames (or bytes that are not frames): `mute` drops them, as it does
                // everything after the handshake.
                if self.mutation == .mute, self.toClient, self.bannerDone {
                    self.muted = true
                    self.buffer.clear()
                    return out
                }
                out.writeBuffer(&self.buffer)
                return out
            }
            if let s = self.streaming {
                let n = min(s.left, self.buffer.readableBytes)
                guard n > 0 else { return out }
                var piece = self.buffer.readSlice(length: n)!
                if self.muted {
                    self.streaming = s.left - n == 0 ? nil : (s.left - n, s.lastCRCAt)
                    continue
                }
                // Position of this piece within the rest of the body: corrupt the last CRC.
                let start = s.left, end = s.left - n
                if self.fault == .wrongCRCOnLargeFrames && self.toClient && start >= s.lastCRCAt && end < s.lastCRCAt {
                    let at = piece.readerIndex + (start - s.lastCRCAt)
                    piece.setInteger(piece.getInteger(at: at, as: UInt8.self)! ^ 0xFF, at: at)
                }
                out.writeBuffer(&piece)
                self.streaming = s.left - n == 0 ? nil : (s.left - n, s.lastCRCAt)
                continue
            }
            if !self.bannerDone {
                guard self.buffer.readableBytes >= 32 else { return out }
                var banner = self.buffer.readSlice(length: 32)!
                self.bannerDone = true
                if !self.toClient, self.fault == .waitsAfterBadMagic, banner.getBytes(at: banner.readerIndex, length: 8) != Banner.magic {
                    self.swallowing = true
                    self.buffer.clear()
                    return out
                }
                if !self.toClient, banner.getBytes(at: banner.readerIndex, length: 8) == Banner.magic {
                    let b = banner.readerIndex
                    self.clientOffers = banner.getInteger(at: b + 12, endianness: .little, as: UInt64.self)!
                    var repaired = false
                    if self.fault == .acceptsVersionZero, banner.getInteger(at: b + 8, endianness: .little, as: UInt16.self) == 0 {
                        banner.setInteger(UInt16(1), at: b + 8, endianness: .little)
                        repaired = true
                    }
                    let version = banner.getInteger(at: b + 8, endianness: .little, as: UInt16.self)!
                    let known: UInt64 = 0x31F  // the bits of version 1: 0-4, 8, 9
                    let supported = banner.getInteger(at: b + 12, endianness: .little, as: UInt64.self)!
                    let required = banner.getInteger(at: b + 20, endianness: .little, as: UInt64.self)!
                    if (self.fault == .refusesNewerVersions && version > 1)
                        || (self.fault == .refusesUnknownOptionalFeatures && supported & ~known != 0 && required & ~known == 0)
                    {
                        self.hangUp = true
                        return out
                    }
                    if repaired || self.fault == .acceptsBannerWithWrongCRC {
                        banner.setInteger(CRC32C.checksum(banner, at: b, length: 28), at: b + 28, endianness: .little)
                    }
                }
                guard banner.getBytes(at: banner.readerIndex, length: 8) == Banner.magic,
                      CRC32C.checksum(banner, at: banner.readerIndex, length: 28) == banner.getInteger(at: banner.readerIndex + 28, endianness: .little, as: UInt32.self)
                else {
                    self.passthrough = true
                    out.writeBuffer(&banner)
                    continue
                }
                if self.mutation == .requiresUnknownFeature && self.toClient {
                    let bit40: UInt64 = 1 << 40
                    let required = banner.getInteger(at: banner.readerIndex + 20, endianness: .little, as: UInt64.self)!
                    banner.setInteger(required | bit40, at: banner.readerIndex + 20, endianness: .little)
                    banner.setInteger(CRC32C.checksum(banner, at: banner.readerIndex, length: 28), at: banner.readerIndex + 28, endianness: .little)
                }
                if self.fault == .ignoresRequiredUnknownFeatures && !self.toClient {
                    let known: UInt64 = 0x31F  // the bits of version 1: 0-4, 8, 9
                    let required = banner.getInteger(at: banner.readerIndex + 20, endianness: .little, as: UInt64.self)!
                    banner.setInteger(required & known, at: banner.readerIndex + 20, endianness: .little)
                    banner.setInteger(CRC32C.checksum(banner, at: banner.readerIndex, length: 28), at: banner.readerIndex + 28, endianness: .little)
                }
                out.writeBuffer(&banner)
                continue
            }
            guard self.buffer.readableBytes >= 32 else { return out }
            let p = self.buffer.readerIndex
            let count = Int(self.buffer.getInteger(at: p + 2, as: UInt8.self)!)
            if !self.toClient, self.stopsReading(at: self.buffer.getSlice(at: p, length: 32)!) {
                // The server stops at this preamble: it never reads it, nor anything after it.
                self.swallowing = true
                self.buffer.clear()
                return out
            }
            guard CRC32C.checksum(self.buffer, at: p, length: 28) == self.buffer.getInteger(at: p + 28, endianness: .little, as: UInt32.self),
                  (1...4).contains(count)
            else {
                self.passthrough = true
                continue
            }
            let lengths = (0..<count).map { Int(self.buffer.getInteger(at: p + 4 + 6 * $0, endianness: .little, as: UInt32.self)!) }
            let body = lengths.reduce(0, +) + 4 * count
            if body > Self.large {
                var preamble = self.buffer.readSlice(length: 32)!
                if !self.muted { out.writeBuffer(&preamble) }
                // Counted from the end of the body: the last CRC is its last 4 bytes.
                self.streaming = (body, 4)
                continue
            }
            guard self.buffer.readableBytes >= 32 + body else { return out }
            var frame = self.buffer.readSlice(length: 32 + body)!
            if self.mutation == .lies {
                guard let lie = Self.lie(frame, lengths: lengths, toClient: self.toClient) else { continue }
                frame = lie
            }
            if let mutation = self.mutation, self.toClient {
                if self.muted { continue }
                let tag = frame.getInteger(at: frame.readerIndex, as: UInt8.self)!
                if tag == FrameTag.close.rawValue { continue }
                if mutation == .mute, [FrameTag.serverIdent, .sessionResumed, .sessionReset].map(\.rawValue).contains(tag) {
                    out.writeBuffer(&frame)
                    self.muted = true
                    continue
                }
            }
            if !self.toClient {
                guard let kept = self.fromClient(frame, lengths: lengths) else {
                    if self.hangUp { return out }
                    continue
                }
                frame = kept
            } else if let answer = self.toClientFault(frame, lengths: lengths) {
                frame = answer
            }
            if self.fault == .forgetsOnResume && self.toClient {
                let tag = frame.getInteger(at: frame.readerIndex, as: UInt8.self)!
                if tag == FrameTag.sessionResumed.rawValue {
                    self.resumed = true
                } else if self.resumed && tag == FrameTag.message.rawValue {
                    continue
                }
            }
            self.rewrite(&frame, lengths: lengths)
            out.writeBuffer(&frame)
        }
    }

    /// A fault of the preamble checks: whether the server stops reading at this preamble
    /// of a client's frame (rather than refusing it).
    private func stopsReading(at preamble: ByteBuffer) -> Bool {
        let p = preamble.readerIndex
        let tag = preamble.getInteger(at: p, as: UInt8.self)!
        let count = Int(preamble.getInteger(at: p + 2, as: UInt8.self)!)
        let byte3 = preamble.getInteger(at: p + 3, as: UInt8.self)!
        let crcRight = CRC32C.checksum(preamble, at: p, length: 28) == preamble.getInteger(at: p + 28, endianness: .little, as: UInt32.self)
        let descriptors = preamble.getBytes(at: p + 4, length: 24)!
        let unusedZero = (1...4).contains(count) && descriptors[(6 * count)...].allSatisfy { $0 == 0 }
        switch self.fault {
        case .ignoresPreambleCRC:
            // A crc MESSAGE preamble whose CRC alone is wrong (not a sealed frame: their
            // preambles are random bytes, which this matches with probability 2^-120).
            return !crcRight && tag == FrameTag.message.rawValue && byte3 == 0 && count == 2 && unusedZero
        case .ignoresSegmentCount: return crcRight && !(1...4).contains(count)
        case .ignoresPreambleByte3: return crcRight && byte3 != 0
        case .ignoresUnusedDescriptors: return crcRight && byte3 == 0 && (1...4).contains(count) && !unusedZero
        default: return false
        }
    }

    /// The faults of the frame checks on one whole frame from the client (CRCs right): the
    /// frame to pass on, or nil when the server skips it.
    private mutating func fromClient(_ frame: ByteBuffer, lengths: [Int]) -> ByteBuffer? {
        var frame = frame
        let p = frame.readerIndex
        let tag = frame.getInteger(at: p, as: UInt8.self)!
        let isMessage = tag == FrameTag.message.rawValue
        // DIRECT frames carry a service's requests (section 7.16), not control: like MESSAGEs
        // they may have a second segment, and their flags are refused by R-7.16-4's check.
        let isKnownControl = !isMessage && tag != FrameTag.direct.rawValue && FrameTag(rawValue: tag).isKnown
        // The header faults act on frames the server would have read (segment CRCs right).
        let header = isMessage && lengths[0] >= 32 && Self.segmentCRCsRight(frame, lengths: lengths) ? p + 32 : nil
        let refused: Bool
        switch self.fault {
        case .refusesExtraSegments: refused = (isKnownControl && lengths.count > 1) || (isMessage && lengths.count > 3)
        case .refusesIgnorableTags: refused = FrameTag(rawValue: tag).isIgnorable
        case .refusesFlagsOnControlFrames: refused = isKnownControl && frame.getInteger(at: p + 1, as: UInt8.self)! != 0
        case .refusesEmptyPeerAddress:
            let hello = tag == FrameTag.hello.rawValue ? try? Parley_V1_Hello(parleyPayload: frame.getSlice(at: p + 32, length: lengths[0])!) : nil
            refused = hello.map { $0.entityType == .client && $0.peerAddress.isEmpty } ?? false
        default: refused = false
        }
        if refused {
            self.hangUp = true
            return nil
        }
        let segment = frame.getSlice(at: p + 32, length: lengths[0])!
        let firstHello = tag == FrameTag.hello.rawValue && !self.helloSeen
        if tag == FrameTag.hello.rawValue { self.helloSeen = true }
        let inHandshake = !self.identSeen
        if tag == FrameTag.clientIdent.rawValue || tag == FrameTag.sessionReconnect.rawValue {
            self.identSeen = true
            self.reconnecting = tag == FrameTag.sessionReconnect.rawValue
        }
        var firstMessage = false
        if isMessage {
            self.messagesSeen += 1
            firstMessage = self.messagesSeen == 1
        }
        let kind = header.map { MessageKind(rawValue: frame.getInteger(at: $0 + 24, as: UInt8.self)!) }
        func offers(_ f: ParleyFeatures) -> Bool { self.clientOffers & f.rawValue != 0 }
        switch self.fault {
        case .skipsUndecodableClientIdents where tag == FrameTag.clientIdent.rawValue:
            if (try? Parley_V1_ClientIdent(parleyPayload: segment)) == nil { return nil }
        case .skipsUndecodableHellos where firstHello:
            if (try? Parley_V1_Hello(parleyPayload: segment)) == nil { return nil }
        case .skipsHellosInTheSession where tag == FrameTag.hello.rawValue && !firstHello:
            return nil
        case .skipsServerIdentsFromClients where tag == FrameTag.serverIdent.rawValue:
            return nil
        case .ignoresCloseInTheHandshake where tag == FrameTag.close.rawValue && inHandshake,
             .ignoresCloseInTheSession where tag == FrameTag.close.rawValue && !inHandshake:
            return nil
        case .skipsUndecodableAuthMore where tag == FrameTag.authRequestMore.rawValue:
            // The AUTH_REQUEST_MORE of method secret carries a SecretAuthProof.
            guard let more = try? Parley_V1_AuthMore(parleyPayload: segment) else { return nil }
            if (try? Parley_V1_SecretAuthProof(serializedBytes: more.payload)) == nil { return nil }
        case .skipsShortChallenges where tag == FrameTag.authRequest.rawValue:
            if let request = try? Parley_V1_AuthRequest(parleyPayload: segment), request.method == AuthMethod.secret,
               let secret = try? Parley_V1_SecretAuthRequest(serializedBytes: request.payload), secret.clientChallenge.count != 32
            {
                return nil
            }
        case .ignoresModeMismatch where tag == FrameTag.authRequest.rawValue:
            guard var request = try? Parley_V1_AuthRequest(parleyPayload: segment), request.method == AuthMethod.none,
                  !request.offeredModes.isEmpty, !request.offeredModes.contains("crc") else { break }
            request.offeredModes.append("crc")
            var b = ByteBuffer()
            b.writeFrame(Frame(tag: .authRequest, segments: [request.parleyPayload()]))
            return b
        case .skipsLongHeaders:
            if let h = header, lengths[0] > 32 + Int(frame.getInteger(at: h + 26, endianness: .little, as: UInt16.self)!) { return nil }
        case .skipsNonUTF8TypeNames:
            if let h = header {
                let n = min(Int(frame.getInteger(at: h + 26, endianness: .little, as: UInt16.self)!), lengths[0] - 32)
                if String(validating: frame.getBytes(at: h + 32, length: n)!, as: UTF8.self) == nil { return nil }
            }
        case .skipsMisnumberedFirstMessages:
            if let h = header, firstMessage, !self.reconnecting, frame.getInteger(at: h, endianness: .little, as: UInt64.self) != 1 { return nil }
        case .skipsCancelsWithoutStreams where kind == .cancel && !offers(.streams),
             .skipsDataSegmentsWithoutTheFeature where isMessage && lengths.count == 3 && !offers(.dataSegment),
             .skipsKeepalivesWithoutTheFeature where tag == FrameTag.keepalive.rawValue && !offers(.keepalive),
             .skipsAcksWithoutLosslessSessions where tag == FrameTag.ack.rawValue && !offers(.reconnect),
             .skipsReconnectsWithoutLosslessSessions where tag == FrameTag.sessionReconnect.rawValue && !offers(.reconnect):
            return nil
        case .skipsShortSessionTokens where tag == FrameTag.sessionReconnect.rawValue:
            if let r = try? Parley_V1_SessionReconnect(parleyPayload: segment), r.sessionToken.count != 16 { return nil }
        case .ignoresTheClientsFrameLimit where firstHello:
            guard var hello = try? Parley_V1_Hello(parleyPayload: segment), hello.maxFrameSize == 1 else { break }
            hello.maxFrameSize = 0
            var b = ByteBuffer()
            b.writeFrame(Frame(tag: .hello, segments: [hello.parleyPayload()]))
            return b
        default:
            break
        }
        switch self.fault {
        case .ignoresSegmentCRCs:
            Self.fixCRCs(&frame, lengths: lengths)
        case .acceptsServerEntityType where tag == FrameTag.hello.rawValue && lengths.count == 1:
            guard var hello = try? Parley_V1_Hello(parleyPayload: frame.getSlice(at: p + 32, length: lengths[0])!), hello.entityType == .server else { break }
            hello.entityType = .client
            var b = ByteBuffer()
            b.writeFrame(Frame(tag: .hello, segments: [hello.parleyPayload()]))
            return b
        case .skipsUnknownCriticalTags where (0x20..<0x80).contains(tag) && !FrameTag(rawValue: tag).isKnown:
            return nil
        case .skipsNoticesFromClients where tag == FrameTag.notice.rawValue:
            return nil
        case .skipsShortKeepalives where tag == FrameTag.keepalive.rawValue && lengths[0] != 8:
            return nil
        case .skipsShortAcks where tag == FrameTag.ack.rawValue && lengths[0] != 8:
            return nil
        case .skipsOneSegmentMessages where isMessage && lengths.count == 1:
            return nil
        case .skipsShortHeaders where isMessage && lengths[0] < 32:
            return nil
        case .skipsOverlongTypeNames:
            if let h = header, frame.getInteger(at: h + 26, endianness: .little, as: UInt16.self)! > 1024 { return nil }
        case .skipsUnknownKinds:
            if let h = header, !MessageKind(rawValue: frame.getInteger(at: h + 24, as: UInt8.self)!).isKnown { return nil }
        case .ignoresHeaderReservedBytes:
            if let h = header { frame.setInteger(UInt32(0), at: h + 28); Self.fixCRCs(&frame, lengths: lengths) }
        case .ignoresHeaderFlags:
            if let h = header { frame.setInteger(UInt8(0), at: h + 25); Self.fixCRCs(&frame, lengths: lengths) }
        case .ignoresFrameFlagsOnMessages where isMessage && Self.segmentCRCsRight(frame, lengths: lengths):
            frame.setInteger(UInt8(0), at: p + 1)
            Self.fixCRCs(&frame, lengths: lengths)
        default:
            break
        }
        return frame
    }

    /// The `lies` mutation of one whole frame: the frame to pass on instead, or nil to drop it.
    private static func lie(_ frame: ByteBuffer, lengths: [Int], toClient: Bool) -> ByteBuffer? {
        let p = frame.readerIndex
        guard let tag = frame.getInteger(at: p, as: UInt8.self), lengths.count == 1, let segment = frame.getSlice(at: p + 32, length: lengths[0]) else { return frame }
        func encoded(_ tag: FrameTag, _ message: some SwiftProtobuf.Message) -> ByteBuffer {
            var b = ByteBuffer()
            b.writeFrame(Frame(tag: tag, segments: [message.parleyPayload()]))
            return b
        }
        switch (toClient, FrameTag(rawValue: tag)) {
        case (true, .hello):
            guard var hello = try? Parley_V1_Hello(parleyPayload: segment) else { return frame }
            hello.maxFrameSize = 1000
            return encoded(.hello, hello)
        case (true, .authBadMethod):
            guard var bad = try? Parley_V1_AuthBadMethod(parleyPayload: segment) else { return frame }
            bad.method = ""
            bad.allowedMethods = []
            return encoded(.authBadMethod, bad)
        case (true, .serverIdent):
            guard var ident = try? Parley_V1_ServerIdent(parleyPayload: segment), !ident.sessionToken.isEmpty else { return frame }
            ident.sessionToken = Data(repeating: 0xAB, count: 16)
            return encoded(.serverIdent, ident)
        case (true, .sessionReset):
            return nil
        case (false, .hello):
            // Refused by the server: a HELLO of entity type SERVER from a client.
            guard var hello = try? Parley_V1_Hello(parleyPayload: segment), hello.peerAddress.isEmpty else { return frame }
            hello.entityType = .server
            return encoded(.hello, hello)
        default:
            return frame
        }
    }

    /// Applies the fault to one whole frame whose CRCs are right, and makes them right again.
    private func rewrite(_ frame: inout ByteBuffer, lengths: [Int]) {
        let p = frame.readerIndex
        let tag = frame.getInteger(at: p, as: UInt8.self)!
        if self.fault == .wrongCodeForTampering && self.toClient && tag == FrameTag.close.rawValue
            && frame.getBytes(at: p + 32, length: 2) == [0x08, UInt8(ParleyError.Code.handshakeTampered.rawValue)]
        {
            // Status.code (field 1, one varint byte): handshakeTampered becomes authenticationFailed.
            frame.setInteger(UInt8(ParleyError.Code.authenticationFailed.rawValue), at: p + 33)
            Self.fixCRCs(&frame, lengths: lengths)
            return
        }
        guard tag == FrameTag.message.rawValue, lengths.count >= 2, lengths[0] >= 32 else { return }
        let kind = frame.getInteger(at: p + 32 + 24, as: UInt8.self)!
        var changed = false
        switch self.fault {
        case .answersCancelledRequests where !self.toClient && kind == MessageKind.cancel.rawValue:
            // The CANCEL names another id: the server ignores it, and the request runs on.
            let id = frame.getInteger(at: p + 32 + 16, endianness: .little, as: UInt64.self)!
            frame.setInteger(id ^ (1 << 40), at: p + 32 + 16, endianness: .little)
            changed = true
        case .flagsOnErrors where self.toClient && kind == MessageKind.error.rawValue:
            frame.setInteger(UInt8(0x40), at: p + 1)
            changed = true
        default:
            break
        }
        guard changed else { return }
        Self.fixCRCs(&frame, lengths: lengths)
    }

    /// The faults of the server's answers on one whole frame to the client: the frame to
    /// pass on instead, or nil to pass it as it is.
    private func toClientFault(_ frame: ByteBuffer, lengths: [Int]) -> ByteBuffer? {
        var frame = frame
        let p = frame.readerIndex
        let tag = frame.getInteger(at: p, as: UInt8.self)!
        let message = tag == FrameTag.message.rawValue && lengths.count >= 2 && lengths[0] >= 32
        let kind = message ? MessageKind(rawValue: frame.getInteger(at: p + 32 + 24, as: UInt8.self)!) : nil
        let payloadAt = p + 32 + lengths[0]
        switch self.fault {
        case .acksTooHigh where message:
            let at = p + 32 + 8
            frame.setInteger(frame.getInteger(at: at, endianness: .little, as: UInt64.self)! + 100, at: at, endianness: .little)
        case .wrongKeepaliveAckStamp where tag == FrameTag.keepaliveAck.rawValue && lengths == [8]:
            frame.setInteger(frame.getInteger(at: p + 32 + 7, as: UInt8.self)! ^ 1, at: p + 32 + 7)
        case .noDataSegmentAlignment where message && lengths.count == 3:
            frame.setInteger(UInt16(0), at: p + 4 + 12 + 4, endianness: .little)
        case .wrongCodeForUnknownTypes where kind == .error && frame.getBytes(at: payloadAt, length: 2) == [0x08, UInt8(ParleyError.Code.unknownMessageType.rawValue)],
             .wrongCodeForBadPayloads where kind == .error && frame.getBytes(at: payloadAt, length: 2) == [0x08, UInt8(ParleyError.Code.malformedPayload.rawValue)]:
            frame.setInteger(UInt8(ParleyError.Code.invalidArgument.rawValue), at: payloadAt + 1)
        case .wrongStreamItem where kind == .streamItem && frame.getBytes(at: payloadAt, length: 2) == [0x08, 0x02]:
            // CountItem.index (field 1, one varint byte) 2 becomes 7; its line stays.
            frame.setInteger(UInt8(7), at: payloadAt + 1)
        case .dropsEmptyDataSegments where message && lengths.count == 3 && lengths[2] == 0:
            var b = ByteBuffer()
            b.writeFrame(Frame(tag: .message, segments: [frame.getSlice(at: p + 32, length: lengths[0])!, frame.getSlice(at: payloadAt, length: lengths[1])!]))
            return b
        case .badMethodNamesNothing where tag == FrameTag.authBadMethod.rawValue && lengths.count == 1:
            guard var bad = try? Parley_V1_AuthBadMethod(parleyPayload: frame.getSlice(at: p + 32, length: lengths[0])!) else { return nil }
            bad.method = ""
            var b = ByteBuffer()
            b.writeFrame(Frame(tag: .authBadMethod, segments: [bad.parleyPayload()]))
            return b
        default:
            return nil
        }
        Self.fixCRCs(&frame, lengths: lengths)
        return frame
    }

    /// Whether every segment CRC of a whole frame is right.
    private static func segmentCRCsRight(_ frame: ByteBuffer, lengths: [Int]) -> Bool {
        var at = frame.readerIndex + 32
        let epilogue = at + lengths.reduce(0, +)
        for (i, length) in lengths.enumerated() {
            guard CRC32C.checksum(frame, at: at, length: length) == frame.getInteger(at: epilogue + 4 * i, endianness: .little, as: UInt32.self) else { return false }
            at += length
        }
        return true
    }

    /// Makes the preamble and segment CRCs of a rewritten frame right again.
    private static func fixCRCs(_ frame: inout ByteBuffer, lengths: [Int]) {
        let p = frame.readerIndex
        frame.setInteger(CRC32C.checksum(frame, at: p, length: 28), at: p + 28, endianness: .little)
        var at = p + 32
        let epilogue = p + 32 + lengths.reduce(0, +)
        for (i, length) in lengths.enumerated() {
            frame.setInteger(CRC32C.checksum(frame, at: at, length: length), at: epilogue + 4 * i, endianness: .little)
            at += length
        }
    }
}
