// dev/stack's optional service mongo2: mongo-java-server (a second, independent implementation of the
// MongoDB wire protocol) with its in-memory backend, on a given address. Nothing is kept on disk: a
// restart starts empty. dev/stack compiles this file with javac against the jars of pom.xml.
//
//     java -cp 'classes:lib/*' Main 127.0.0.1 27118
import de.bwaldvogel.mongo.MongoServer;
import de.bwaldvogel.mongo.backend.memory.MemoryBackend;

public class Main {
    public static void main(String[] args) {
        if (args.length != 2) {
            System.err.println("usage: Main <host> <port>");
            System.exit(2);
        }
        MongoServer server = new MongoServer(new MemoryBackend());
        try {
            server.bind(args[0], Integer.parseInt(args[1]));
        } catch (Throwable e) {
            // e.g. a BindException (thrown unchecked by Netty): exit, or Netty's threads keep the JVM up
            e.printStackTrace();
            System.exit(1);
        }
        // SIGTERM (dev/stack stop): close the clients and the listener, then exit.
        Runtime.getRuntime().addShutdownHook(new Thread(server::shutdownNow, "mongo2-shutdown"));
        // (Netty's event loop threads are not daemons: the server runs on after main returns.)
    }
}
